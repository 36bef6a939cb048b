"""The measurement protocol, roofline arithmetic, op breakdown and quality metrics."""
import math
import mmap
import os

import pytest
import torch

import llmopt
from llmopt import metrics, profiling
from llmopt.profiling import (categorize, measure, op_breakdown, peak_memory, roofline, sdpa_kernels,
                              summarize, utilization)


def test_summarize_and_measure():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["repeats"] == 4
    calls = []
    r = measure(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and r["repeats"] == 3 and r["min"] <= r["median"] <= r["max"]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure(lambda: None, repeats=0)


def test_roofline_counts():
    cfg = llmopt.get_config("tiny")               # tied: the table is read once, as the output head
    r = roofline(cfg, torch.float32, context=100)
    assert r["weight_bytes"] == cfg.n_params * 4
    assert r["kv_bytes"] == 100 * llmopt.kv_bytes_per_token(cfg, torch.float32)
    assert r["flops_per_token"] == 2 * cfg.n_params + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 100
    untied = cfg.replace(tie_embeddings=False)
    assert roofline(untied, torch.float32, 0)["weight_bytes"] == cfg.n_params * 4  # input table not read whole
    u = utilization(r["bytes_per_step"] / 1e9, cfg, torch.float32, 100, bandwidth=2e9, flops_rate=1e12)
    assert u["mbu"] == pytest.approx(0.5)


def test_roofline_of_a_transformers_model(hf_checkpoint):
    """The roofline takes a user's own transformers model (or its config): the weights it counts as
    read per step are the model's own parameters, the input table left out when untied."""
    family, folder, hf = hf_checkpoint
    params = sum(p.numel() for p in hf.parameters())
    table = 0 if hf.config.tie_word_embeddings else hf.get_input_embeddings().weight.numel()
    r = roofline(hf, torch.float32, context=10)
    assert r["weight_bytes"] == (params - table) * 4
    assert r == roofline(hf.config, torch.float32, context=10) == roofline(llmopt.load_model(folder)[0],
                                                                          torch.float32, context=10)
    with pytest.raises(TypeError, match="expected a ModelConfig"):
        roofline(42)


def test_roofline_of_an_architecture_llmopt_does_not_implement(hf_checkpoint, gpt2):
    """Counted from the model itself: the same figures as from the config for the families llmopt
    implements, and for GPT-2 (Conv1D projections, a position table) counted by hand."""
    from llmopt.profiling import _shape_of_any_model, decode_shape
    _, _, hf = hf_checkpoint
    assert _shape_of_any_model(hf) == decode_shape(hf)
    d, L, V = 64, 2, 512
    # per layer: two layer norms (weight, bias), c_attn (qkv), c_proj (o), c_fc, mlp c_proj
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    matmul = L * per_layer + 2 * d + V * d          # final norm, the tied head; wpe never read whole
    r = roofline(gpt2, torch.float32, context=10)
    assert r["weight_bytes"] == matmul * 4
    assert r["kv_bytes"] == 10 * 2 * L * 4 * 16 * 4
    with pytest.raises(ValueError, match="unsupported architecture"):
        roofline(gpt2.config)                       # a config alone: no weights to count


def test_op_breakdown_covers_the_wall_time():
    model = llmopt.build_model(llmopt.get_config("tiny"))
    ids = torch.randint(0, 4096, (1, 16))
    with torch.inference_mode():
        rows = op_breakdown(lambda: model(ids))
    cats = {r["category"] for r in rows}
    assert {"matmul", "attention", "norm", "host overhead"} <= cats
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert categorize("aten::addmm") == "matmul" and categorize("aten::multinomial") == "sampling"
    assert categorize("void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4>") == "matmul"


def test_op_breakdown_drops_the_profilers_own_stderr_lines_only(capfd):
    def fn():
        torch.ones(64) @ torch.ones(64)
        os.write(2, b"a line of the caller's\n")
    op_breakdown(fn, warmup=0)
    err = capfd.readouterr().err
    assert "USDT:" not in err and "profiler_start" not in err
    assert "a line of the caller's" in err


def test_sdpa_kernels_on_cpu():
    k = sdpa_kernels("cpu")
    assert k["math"] is True and set(k) >= {"flash_attention", "math"}


def test_sdpa_kernels_reports_a_refusal_without_its_warnings(monkeypatch):
    # on a GPU in fp32 each refused kernel printed "... kernel not used because" warnings (H100, 2026-11-28)
    import warnings

    import torch.nn.functional as F
    real = F.scaled_dot_product_attention

    def refusing(q, k, v, **kw):
        warnings.warn("Flash attention kernel not used because: fp32", UserWarning)
        if q.dtype == torch.float32:
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", refusing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # any warning that escapes fails the test
        k = sdpa_kernels("cpu")
    assert set(k.values()) == {False}


def touch_64mib() -> None:
    """64 MiB of fresh pages written and freed: an anonymous mapping straight from the kernel. A tensor
    from malloc can land on memory the process already holds (after enough earlier tests, in one
    CI run its RSS did not rise at all), and then there is no rise to see."""
    with mmap.mmap(-1, 64 * 2**20) as m:
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i] = 1


def test_peak_memory_sees_an_allocation():
    r = peak_memory(touch_64mib, device="cpu")
    assert r["delta_bytes"] > 32 * 2**20


@pytest.mark.skipif(not profiling._reset_peak_rss(), reason="the kernel keeps no resettable RSS peak")
def test_peak_memory_sees_a_spike_between_samples():
    # The sampler never wakes while fn runs (one sample a minute) and the tensor is freed
    # before the last sample: only the kernel's high-water mark can see it.
    r = peak_memory(touch_64mib, device="cpu", interval_s=60)
    assert r["delta_bytes"] > 32 * 2**20

    # a measurement inside another resets the process's mark: the outer one still sees the
    # spike that came before it
    inner = {}

    def outer():
        touch_64mib()                                       # made and freed before the inner reset
        inner.update(peak_memory(lambda: None, device="cpu", interval_s=60))

    r = peak_memory(outer, device="cpu", interval_s=60)
    assert r["delta_bytes"] > 32 * 2**20 and inner["delta_bytes"] < 16 * 2**20


def test_peak_memory_counts_a_child_process_apart_from_its_parent():
    """include_children: a child's 200 MiB shows in the total, the largest process and the largest
    child; the parent's own large tensor shows in the largest process, never as a child's."""
    import subprocess
    import sys
    code = "import time; b = b'x' * (200 * 2**20); time.sleep(0.5)"
    held = torch.ones(300 * 2**20 // 4).add_(1)       # the parent's own memory, larger than the child's
    r = peak_memory(lambda: subprocess.run([sys.executable, "-c", code], check=True), device="cpu",
                    include_children=True)
    assert 200 * 2**20 <= r["max_child_bytes"] < 300 * 2**20 <= r["max_process_bytes"]
    assert r["delta_bytes"] >= 190 * 2**20
    alone = peak_memory(lambda: None, device="cpu", include_children=True)   # (other tests may leave a child)
    assert alone["max_child_bytes"] < held.nbytes <= alone["max_process_bytes"]


def test_perplexity_sliding_window_scores_every_token_once():
    V = 8
    uniform = lambda ids: torch.zeros(*ids.shape, V)  # noqa: E731 - a model with flat logits
    uniform.parameters = lambda: iter([torch.zeros(1)])
    ids = torch.randint(0, V, (100,))
    for context, stride in [(16, 8), (32, 32), (100, 50)]:
        assert metrics.perplexity(uniform, ids=ids, context=context, stride=stride) == pytest.approx(V)
    with pytest.raises(ValueError, match="stride"):
        metrics.perplexity(uniform, ids=ids, context=16, stride=32)
    assert metrics.perplexity(uniform, ids=ids[None], context=16) == pytest.approx(V)   # [1, T]
    for bad in (ids.reshape(2, 50), ids.float()):
        with pytest.raises(ValueError, match="scores one text"):
            metrics.perplexity(uniform, ids=bad)


def test_text_metrics():
    assert metrics.distinct_n(["a b c d"], 1) == 1.0
    assert metrics.distinct_n(["a a a a"], 1) == 0.25
    assert metrics.repetition_rate("x y z x y z x y z", n=3) == pytest.approx(4 / 7)
    assert metrics.repetition_rate([1, 2, 3, 4], n=2) == 0.0
    assert metrics.token_agreement([1, 2, 3], [1, 5, 3, 9]) == pytest.approx(2 / 3)


def test_compare_next_token_against_itself_and_a_perturbed_copy():
    model = llmopt.build_model(llmopt.get_config("tiny"))
    ids = torch.randint(0, 4096, (64,))
    same = metrics.compare_next_token(model, model, ids, context=32)
    assert same["top1_agreement"] == 1.0 and abs(same["kl_divergence"]) < 1e-6
    assert metrics.compare_next_token(model, model, ids[None], context=32) == same    # a [1, T] batch
    assert metrics.compare_next_token(model, model, ids.tolist(), context=32) == same
    noisy = llmopt.build_model(llmopt.get_config("tiny"))
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diff = metrics.compare_next_token(noisy, model, ids, context=32)
    assert diff["kl_divergence"] > 1e-3 and math.isfinite(diff["kl_divergence"])


def test_compare_with_transformers_has_a_row_per_compile_mode_and_sync_every():
    """The GPU suite's decode table: one row per compiled mode, each again reading every k tokens;
    every llmopt row's greedy tokens equal transformers' own (fp32 on the CPU)."""
    from llmopt.bench import compare_with_transformers, to_transformers
    model, tok = llmopt.load_model("tiny")
    hf = to_transformers(model)
    rows = compare_with_transformers(model, tok, hf, prompt="ROMEO:", new_tokens=6, repeats=1,
                                     compiled=("default",), sync_every=3, graph_steps=4)
    assert [r["label"] for r in rows] == [
        "llmopt (static cache)", "llmopt compiled decode (default)",
        "llmopt compiled decode (default), sync every 3 tokens",
        "llmopt compiled decode (default), 4 steps per CUDA graph", "transformers generate"]
    assert [r["greedy_token_agreement"] for r in rows] == [1.0] * 5
    rows = compare_with_transformers(model, tok, hf, prompt="ROMEO:", new_tokens=6, repeats=1, sync_every=3,
                                     graph_steps=4)
    assert [r["label"] for r in rows] == ["llmopt (static cache)", "llmopt (static cache), sync every 3 tokens",
                                          "llmopt (static cache), 4 steps per CUDA graph", "transformers generate"]
    assert [r["greedy_token_agreement"] for r in rows] == [1.0] * 4


def test_graph_variants_record_one_graph_per_distinct_step_compile():
    """reduce-overhead's CUDA graphs cannot sit inside llmopt's graph: its step compiles as default's,
    so the two give one graph row, not two."""
    from llmopt.bench import graph_variants
    assert graph_variants(("reduce-overhead", "default", "max-autotune"), 16) == [
        ("llmopt compiled decode (default), 16 steps per CUDA graph", {"compile": "reduce-overhead", "graph_steps": 16}),
        ("llmopt compiled decode (max-autotune-no-cudagraphs), 16 steps per CUDA graph",
         {"compile": "max-autotune", "graph_steps": 16})]
    assert graph_variants((), 8, ", fused projections") == [
        ("llmopt (static cache), fused projections, 8 steps per CUDA graph", {"graph_steps": 8})]
