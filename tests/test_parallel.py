"""Data and tensor parallel generation over torch.distributed: 2 gloo processes on this CPU."""
import os
from pathlib import Path

import pytest

import llmopt
from llmopt.parallel import launch, shard_model

# "--help" and "-x" reach the ranks as prompts, not as options (launch passes them as JSON)
PROMPTS = ["ROMEO:", "KING:\nNow", "JULIET:", "To be, or not to be", "A", "--help", "-x"]


def test_tensor_parallel_matches_single_process():
    r = launch("tensor", 2, max_new_tokens=24, prompts=["ROMEO:\nBut soft"])
    assert r["world_size"] == 2
    assert r["max_abs_logit_diff"] < 1e-4          # logits of the prompt, every position
    assert r["tokens_equal"] and r["same_greedy"] and len(r["tokens"]) == 24
    assert r["all_reduces_per_token"] == 2 * llmopt.get_config("tiny").n_layers
    assert 0 < r["comm_share"] < 1 and r["comm_s_per_token"] > 0


def test_data_parallel_gathers_in_order_and_matches():
    model, tok = llmopt.load_model("tiny")
    r = launch("data", 2, max_new_tokens=12, prompts=PROMPTS)
    assert len(r["rank_seconds"]) == 2 and r["prompts"] == len(PROMPTS)
    for prompt, ids in zip(PROMPTS, r["outputs"]):
        assert ids == llmopt.generate(model, tok, prompt, max_new_tokens=12, ignore_eos=True).token_ids


def test_shard_refuses_indivisible_heads_and_bad_launch():
    model, _ = llmopt.load_model("tiny")           # 8 heads, 4 kv heads
    with pytest.raises(ValueError, match="divisible by 3"):
        shard_model(model, 0, 3)
    with pytest.raises(ValueError, match="mode"):
        launch("expert", 2)
    with pytest.raises(RuntimeError, match="torchrun failed"):
        launch("tensor", 2, model="no-such-model", max_new_tokens=2)


def test_pipeline_parallel_matches_single_process_and_reports_the_bubble():
    r = launch("pipeline", 2, max_new_tokens=8, batch=4, micro_batches=2)
    assert r["world_size"] == 2 and [run["micro_batches"] for run in r["runs"]] == [1, 2]
    for run in r["runs"]:
        assert run["tokens_equal"]                                  # same greedy tokens as one process
        assert 0 <= run["bubble"] < 1 and len(run["busy_s"]) == 2
    assert r["runs"][0]["ideal_bubble"] == 0.5 and r["runs"][1]["ideal_bubble"] == 1 / 3


def test_stage_split_covers_every_layer_once():
    from llmopt.parallel import stage_of
    ranges = [stage_of(llmopt.load_model("tiny")[0], r, 3).layer_range for r in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 4
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError, match="at most 4"):
        stage_of(llmopt.load_model("tiny")[0], 0, 5)


def test_ranks_take_a_gpu_each_only_when_there_is_one_for_every_rank(monkeypatch):
    import torch
    from llmopt.parallel import ranks_use_gpus
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ranks_use_gpus(1) and not ranks_use_gpus(2)       # 2 ranks on one GPU: gloo on the CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert ranks_use_gpus(2) and ranks_use_gpus(8) and not ranks_use_gpus(9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not ranks_use_gpus(1)


def test_ranks_import_this_llmopt_from_any_folder(tmp_path):
    # the lent GPU machine runs from a checkout, llmopt not installed: notebook 10's ranks failed with
    # "No module named 'llmopt'" (2026-11-28); the ranks now get this llmopt's folder on PYTHONPATH
    import subprocess
    import sys

    from llmopt.parallel import rank_env
    env = rank_env(3)
    root = str(Path(llmopt.__file__).resolve().parent.parent)
    assert env["OMP_NUM_THREADS"] == "3" and env["PYTHONPATH"].split(os.pathsep)[0] == root
    out = subprocess.run([sys.executable, "-c", "import llmopt; print(llmopt.__file__)"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve() == Path(llmopt.__file__).resolve()
