"""The scoreboard's metrics measure what they claim, on the embedded model."""
import pytest
import torch

import llmopt
from llmopt.evaluate import context_relevance, scoreboard, type_token_ratio, workbook_variants
from llmopt.metrics import heldout_ids


@pytest.fixture(scope="module")
def tiny():
    return llmopt.load_model("tiny")


def test_type_token_ratio():
    assert type_token_ratio([[1, 2, 3], [4]]) == 1.0
    assert type_token_ratio([[1, 1, 1, 1]]) == 0.25
    assert type_token_ratio([]) == 0.0


def test_context_relevance_tells_real_continuations_from_mismatched(tiny):
    model, tok = tiny
    ids = heldout_ids(tok, "test", max_tokens=6 * 96).tolist()
    prompts = [ids[i:i + 64] for i in range(0, 6 * 96, 96)]
    conts = [ids[i + 64:i + 96] for i in range(0, 6 * 96, 96)]
    real = context_relevance(model, prompts, conts)
    mismatched = context_relevance(model, prompts[1:] + prompts[:1], conts)
    assert real["relevance_nats"] > 0.2
    assert real["relevance_nats"] > mismatched["relevance_nats"] + 0.2
    assert real["ppl_with_prompt"] < real["ppl_without_prompt"]


def test_scoreboard_ranks_quality_and_names_the_baseline(tiny):
    model, tok = tiny
    variants = workbook_variants(model, tok, new_tokens=12, ngram_text="ROMEO: to be or not to be")
    assert {"fp32 baseline", "int8 weight-only", "half the heads and channels",
            "speculative (lookup + n-gram)"} <= set(variants)
    keep = {k: variants[k] for k in ("fp32 baseline", "int8 weight-only", "half the heads and channels",
                                     "speculative (lookup + n-gram)", "continuous-batching engine")}
    rows = {r["technique"]: r for r in scoreboard(keep, tok, ["ROMEO:", "KING:\nNow"], baseline="fp32 baseline",
                                                  eval_tokens=600, bandwidth=1e10,
                                                  repeats=1)}
    base = rows["fp32 baseline"]
    assert base["top1_agreement"] == 1.0 and base["kl_divergence"] == pytest.approx(0, abs=1e-6)
    assert base["perplexity_change"] == 0 and base["speedup"] == 1
    assert abs(rows["int8 weight-only"]["perplexity_change"]) < 0.02
    assert rows["int8 weight-only"]["model_bytes"] < 0.3 * base["model_bytes"]
    cut = rows["half the heads and channels"]
    assert cut["perplexity_change"] > 0.1 and cut["top1_agreement"] < 0.9     # smaller, and worse
    assert cut["model_bytes"] < base["model_bytes"]
    for same in ("speculative (lookup + n-gram)", "continuous-batching engine"):  # same tokens as the baseline
        assert rows[same]["distinct_2"] == base["distinct_2"]
        assert rows[same]["relevance_nats"] == pytest.approx(base["relevance_nats"])
    for r in rows.values():
        assert 0 < r["distinct_1"] <= 1 and 0 <= r["repetition_rate"] <= 1 and r["mbu"] > 0
        assert r["tpot_s"] > 0 and torch.isfinite(torch.tensor(r["perplexity"]))


def test_workbook_variants_name_the_baseline_by_the_models_dtype():
    """A bf16 checkpoint is its own baseline ("bf16 baseline", first), with no separate bf16 row;
    int4 takes a group size that divides the model's widths."""
    model = llmopt.build_model(llmopt.get_config("tiny").replace(intermediate_size=96), dtype=torch.bfloat16)
    tok = llmopt.load_model("tiny")[1]
    variants = workbook_variants(model, tok, new_tokens=4, ngram_text="ROMEO: to be or not to be")
    assert next(iter(variants)) == "bf16 baseline" and "bf16 weights" not in variants
    assert "int4 weight-only (g32)" in variants                # 96 MLP channels: groups of 64 do not fit


def _tied_tiny():
    """tiny with two tokens' output rows made equal at one greedy step: an exact tie to part at."""
    model, tok = llmopt.load_model("tiny")
    prompt = tok.encode("ROMEO:\n")
    ref = llmopt.generate(model, tok, prompt, max_new_tokens=12).token_ids
    pos = 5                                             # the step whose choice we tie
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:pos]]))[0, -1]
        runner_up = logits.topk(2).indices[1].item()
    untied = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # the head is tied to the embeddings
    with torch.no_grad():
        untied[runner_up] = untied[ref[pos]]
    model.lm_head.weight = untied
    return model, prompt, ref, pos, runner_up


def test_greedy_outputs_that_part_at_a_tie_pass_and_elsewhere_fail():
    model, prompt, ref, pos, runner_up = _tied_tiny()
    same = llmopt.metrics.check_same_greedy(model, prompt, ref, list(ref))
    assert same["identical"] and same["position"] is None and same["agreement"] == 1.0
    # the other side of the tie, then anything at all: a rounding flip the check accepts
    flipped = ref[:pos] + [runner_up] + [7] * (len(ref) - pos - 1)
    d = llmopt.metrics.check_same_greedy(model, prompt, ref, flipped, what="the tie")
    assert d["tie"] and d["position"] == pos and d["tokens"] == (ref[pos], runner_up) and d["gap"] <= 1e-5
    # a token far from the best at the same step, or a parting one step earlier: a fault
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:pos]]))[0, -1]
    worst = logits.argmin().item()
    with pytest.raises(AssertionError, match=rf"batching changed the greedy output at token {pos}: .*not a rounding"):
        llmopt.metrics.check_same_greedy(model, prompt, ref, ref[:pos] + [worst] + ref[pos + 1:], what="batching")
    early = ref[:pos - 1] + [runner_up] + ref[pos:]
    d = llmopt.metrics.greedy_divergence(model, prompt, ref, early)
    assert not d["tie"] and d["position"] == pos - 1 and d["gap"] > 1.0
    # one output stopping early is no tie either
    d = llmopt.metrics.greedy_divergence(model, prompt, ref, ref[:-2])
    assert not d["tie"] and d["position"] == len(ref) - 2 and d["tokens"] == (ref[-2], None)


def test_the_tie_gap_follows_the_models_compute_dtype():
    model, tok = llmopt.load_model("tiny", dtype="bf16")
    assert llmopt.metrics.compute_dtype(model) == torch.bfloat16
    prompt = tok.encode("ROMEO:\n")
    ref = llmopt.generate(model, tok, prompt, max_new_tokens=4).token_ids
    d = llmopt.metrics.greedy_divergence(model, prompt, ref, ref[:3] + [ref[3] + 1])
    assert d["tie_gap"] == llmopt.metrics.TIE_GAP[torch.bfloat16] > llmopt.metrics.TIE_GAP[torch.float32]
    from llmopt.quantize import quantize
    int8 = quantize(llmopt.load_model("tiny")[0], "int8")
    assert llmopt.metrics.compute_dtype(int8) == torch.float32   # int8 weights, fp32 arithmetic
