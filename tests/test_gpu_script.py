"""The prepared GPU suite runs end to end in CPU smoke mode, so it never rots; so does the notebook runner
the lent machines use (tools/run_notebooks.py), here also with another MODEL."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_kernels_gemv_sweep_smoke(capsys):
    """`gpu_kernels.py --gemv` (not in the session since the 2026-11-28 sweep): the GEMV's picks and
    neighbours on int8 weights and on weights in the activations' dtype, timed (here in Triton's interpreter)."""
    spec = importlib.util.spec_from_file_location("gpu_kernels", ROOT / "benchmarks" / "gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--gemv", "--variants", ""]) == 0
    out = capsys.readouterr().out
    assert "== Triton GEMV (cpu, int8 weights)" in out and "== Triton GEMV (cpu, float32 weights)" in out, out
    assert out.count("*1x") == 2 and out.count("o [") == 2, out


def test_gpu_session_smoke(tmp_path):
    """benchmarks/gpu_session.sh, the one call a lent GPU session makes, end to end in CPU smoke mode:
    the whole suite, the decode attention timings and kernel profiles, and the CUDA-only tests (skipped here)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    log = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--smoke"], env=env, cwd=ROOT,
                         check=True, timeout=600, capture_output=True, text=True).stdout
    for step in ("suite", "kernels", "cuda-tests"):
        assert f"[{step}] exit 0 after" in log, log
    kernels = (tmp_path / "kernels-log.txt").read_text()
    assert "== decode attention (cpu" in kernels and "96 keys, 96 written: SDPA" in kernels, kernels
    assert "with rotary and the cache write: compiled around the kernel" in kernels and "(append)" in kernels
    assert "== 1 folded layers' kernels in a row (cpu, 6 kernels" in kernels, kernels
    assert kernels.count("dependent launches: not on this device; plain launches") == 2, kernels
    assert "float32 weights (" in kernels and "int8 weights (" in kernels, kernels
    assert "== bf16-folded-attn: TPOT" in kernels, kernels
    assert "skipped" in (tmp_path / "cuda-tests-log.txt").read_text()
    assert "| goal | target | measured | met | row |" in log      # the session prints the goals table

    res = json.loads((tmp_path / "suite" / "gpu_results.json").read_text())
    assert res["smoke"] and res["coordinate_descent_tuning"] is False and "error" not in res["probes"], res["probes"]
    assert "error" not in res["decode_batch1"], res["decode_batch1"]
    rows = res["decode_batch1"]["rows"]
    assert [r["label"] for r in rows] == [
        "llmopt (static cache)", "llmopt (static cache), sync every 16 tokens",
        "llmopt (static cache), 16 steps per CUDA graph",
        "llmopt (static cache), fused projections, 16 steps per CUDA graph", "transformers generate"]
    assert [r["greedy_token_agreement"] for r in rows] == [1.0] * 5    # the graph rows against llmopt's eager
    assert [r["label"] for r in res["quantized_decode"]["rows"]] == [   # no Triton GEMV row on a CPU
        "int8 weight-only, fused projections (static cache), 16 steps per CUDA graph",
        "int8 weight-only",
        "int4 g64 weight-only (static cache), 16 steps per CUDA graph"]
    for part in ("quantized_decode", "attention_prefill", "batching", "batching_dialogue", "speculative",
                 "speculative_engine", "bitsandbytes"):
        assert "error" not in res[part], res[part]
        assert res[part]["rows"]
    assert all(r["identical"] for r in res["batching"]["rows"] + res["batching_dialogue"]["rows"])
    assert all(r["identical"] for r in res["speculative"]["rows"][1:] + res["speculative_engine"]["rows"])
    assert [r["batch_size"] for r in res["speculative_engine"]["rows"]] == [1, 4] * 6     # 3 drafts, eager and graphs
    md = (tmp_path / "suite" / "gpu_results.md").read_text()
    assert "| tiny-draft (MLP), batch 4 |" in md and "| prompt lookup, batch 1, CUDA graphs |" in md
    assert md.startswith("# GPU suite") and "| decode MBU (batch 1, bf16, compiled) | 70% | not run | - |" in md
    goals = {g["row"]: g for g in res["goals"]}
    fcfs = goals["batching_dialogue: continuous batching"]
    assert fcfs["measured"] == res["batching_dialogue"]["rows"][2]["throughput_vs_static"]
    assert fcfs["met"] is (fcfs["measured"] >= 3.0)


def test_goals_from_the_h100_run_of_2026_11_27():
    """The goals table read off a committed H100 result: the figures its README quotes."""
    res = json.loads((ROOT / "results" / "gpu-NVIDIA-H100-80GB-HBM3-2026-11-27" / "run1-full-suite.json").read_text())
    for part in ("decode_batch1", "quantized_decode"):      # a path that failed is left out, not fatal
        res[part]["rows"].insert(0, {"label": "llmopt compiled decode (default), 16 steps per CUDA graph",
                                     "error": "RuntimeError: the graph could not be recorded"})
    g = _suite().goals(res)
    assert [x["met"] for x in g] == [False, True, False, False, False]
    assert g[0]["measured"] == pytest.approx(0.481, abs=1e-3)        # MBU 48%
    assert g[1]["measured"] == pytest.approx(552.1 / 82.8, rel=1e-3)  # 6.67x
    assert g[2]["measured"] == pytest.approx(619.6 / 552.1, rel=1e-3)  # int8 vs the fastest bf16 row
    assert [x["row"] for x in g[3:]] == ["batching: continuous batching", "batching: continuous batching, longest first"]
    assert g[4]["measured"] == pytest.approx(1.41, abs=0.005)


def test_goals_and_report_of_the_h100_run_of_2026_11_28(tmp_path):
    """A run stopped by its time limit (355 s, before speculation): --render writes its report from the JSON,
    goals as its README quotes them."""
    saved = tmp_path / "run1-suite.json"
    saved.write_text((ROOT / "results" / "gpu-NVIDIA-H100-80GB-HBM3-2026-11-28" / "run1-suite.json").read_text())
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--render", str(saved)], check=True,
                   cwd=ROOT, timeout=120, capture_output=True)
    md = (tmp_path / "run1-suite.md").read_text()
    assert "| decode MBU (batch 1, bf16, compiled) | 70% | 59% | **no** |" in md
    assert "| llmopt compiled decode / transformers eager generate | 3.00x | 7.99x | yes |" in md
    assert "| int8 weight-only / bf16, both compiled | 1.40x | 1.37x | **no** | int8 weight-only, fused projections, Triton GEMV" in md
    assert "| continuous / static batching throughput, dialogue turns | 3.00x | 3.73x | yes |" in md
    assert "speculative" not in md and "Prefill" not in md            # not reached: left out, not fatal


def test_gpu_suite_runs_only_the_sections_asked(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path),
                    "--only", "attention_prefill"], check=True, cwd=ROOT, timeout=300)
    res = json.loads((tmp_path / "gpu_results.json").read_text())
    assert "attention_prefill" in res and "decode_batch1" not in res and "batching" not in res
    md = (tmp_path / "gpu_results.md").read_text()
    assert "Prefill (TTFT), plain vs SDPA attention:" in md and "| decode MBU (batch 1, bf16, compiled) | 70% | not run |" in md


def test_notebooks_run_as_scripts_where_there_is_no_jupyter(tmp_path):
    """tools/run_notebooks.py, for a lent GPU machine (torch, no Jupyter): a real notebook passes at CI
    size; a failing cell fails its notebook (exit 1, the cell named) and a missing import skips one."""
    def notebook(name, *cells):
        cells = [{"cell_type": "code", "id": str(i), "outputs": [], "execution_count": None, "source": src,
                  "metadata": {"tags": ["parameters"]} if src.startswith("# parameters") else {}}
                 for i, src in enumerate(cells)]
        (tmp_path / name).write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                                 "nbformat_minor": 5}))
        return str(tmp_path / name)
    good = str(ROOT / "notebooks" / "03_attention_kernels.ipynb")
    bad = notebook("bad.ipynb", "x = 1", "assert x == 2, 'x is not 2'")
    missing = notebook("missing.ipynb", "import no_such_module_here")
    # --param overrides a parameter after the parameters cell (a path from here made absolute; 03 has no WHERE)
    (tmp_path / "mine").mkdir()
    params = notebook("params.ipynb", "# parameters\nWHERE = 'tiny'\nN = 1", "from pathlib import Path",
                      "assert N == 5 and Path(WHERE).is_absolute() and Path(WHERE).name == 'mine', (N, WHERE)")
    out = tmp_path / "notebooks.md"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "run_notebooks.py"), "--ci", "--out", str(out),
                          "--param", "N=5", "--param", "WHERE='mine'", good, bad, missing, params],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "03_attention_kernels.ipynb: passed" in run.stdout
    assert "bad.ipynb: failed at cell 1" in run.stdout and "x is not 2" in run.stdout
    assert "missing.ipynb: skipped (no no_such_module_here) at cell 0" in run.stdout
    assert "params.ipynb: passed" in run.stdout, run.stdout
    assert "| 03_attention_kernels.ipynb | passed |" in out.read_text() and "N=5" in out.read_text()


def test_every_notebook_runs_with_another_model():
    """MODEL is a parameter: with the trained 2-layer `tiny-draft-llama` in place of `tiny`, every notebook
    that takes a MODEL runs top to bottom at CI size and its assertions hold (nothing assumes tiny's shape)."""
    notebooks = sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb") if not p.name.startswith("12_"))
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "run_notebooks.py"), "--ci",
                          "--param", "MODEL='tiny-draft-llama'", *notebooks],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.endswith(" s)") and ".ipynb: " in line]
    assert run.returncode == 0 and len(lines) == len(notebooks), run.stdout[-3000:] + run.stderr[-2000:]
    assert all(": passed (" in line for line in lines), lines


def _stand_in():
    spec = importlib.util.spec_from_file_location("stand_in", ROOT / "tools" / "stand_in_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_stand_in_checkpoints_are_what_they_stand_in_for(tmp_path, kind):
    """tools/stand_in_checkpoint.py: tiny's weights as transformers writes a Llama 3.2 (rope scaling, a
    131,072-token context, BOS from tokenizer.json) or a Qwen2 (q, k, v biases); llmopt reads each with
    transformers' logits and prompt ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import llmopt
    folder = _stand_in().make(kind, tmp_path / kind)
    model, tok = llmopt.load_model(folder, dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    text = "ROMEO:\nBut soft, what light"
    ids = tok.encode(text)
    assert ids == AutoTokenizer.from_pretrained(str(folder)).encode(text) and tok.decode(ids) == text
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])), hf(torch.tensor([ids])).logits, atol=1e-4, rtol=1e-4)
    cfg = model.config
    if kind == "llama3":
        assert ids[0] == tok.bos_token_id == 0 and ids[1] != 0
        assert cfg.max_seq_len == 131072 and cfg.rope_scaling["rope_type"] == "llama3" and model.dtype == torch.float32
    else:
        assert ids[0] != 0 and model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_notebooks_run_with_stand_ins_for_real_checkpoints(tmp_path, kind):
    """On a GPU at full size the notebooks take a real checkpoint (`pick_model`): with a stand-in for
    Llama 3.2 (bf16, BOS, a 131,072-token context) and one for Qwen2 (bf16, q, k, v biases) as MODEL,
    every notebook that loads MODEL runs at CI size and its assertions hold (bf16 ties included)."""
    folder = _stand_in().make(kind, tmp_path / kind)
    notebooks = sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb") if p.name[:2] not in ("09", "10", "12"))
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "run_notebooks.py"), "--ci", *notebooks],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "LLMOPT_MODEL": str(folder)})
    lines = [line for line in run.stdout.splitlines() if line.endswith(" s)") and ".ipynb: " in line]
    assert run.returncode == 0 and len(lines) == len(notebooks) == 11, run.stdout[-3000:] + run.stderr[-2000:]
    assert all(": passed (" in line for line in lines), lines
    assert run.stdout.count(f"model: {folder} (from $LLMOPT_MODEL)") == len(notebooks)
