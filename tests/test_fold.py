"""fold_layers: a layer's norms, SwiGLU and residual adds inside its GEMVs (llmopt.kernels.gemv), the same model.

Without a GPU the GEMV runs in Triton's CPU interpreter (conftest turns it on); its CUDA checks are in
test_quantize.py (int8) and below (bf16), and tests/test_kernels.py compiles every variant for an H100.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmopt
from llmopt.fold import FoldedBlock, FoldedTransformer, fold_layers, linear_gemv, unfold_layers
from llmopt.generate import decode_one_token, prefill
from llmopt.kv_cache import make_cache
from llmopt.model import Block, RMSNorm, Transformer
from llmopt.quantize import Int8Linear, quantize, quantize_int8

HAS_TRITON = importlib.util.find_spec("triton") is not None
interpreter = pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(),
                                 reason="needs Triton, and runs its CPU interpreter where there is no GPU")


@interpreter
@pytest.mark.parametrize("config", [{"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4},   # whole blocks
                                    {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 2}],     # ragged N and K
                         ids=["even", "ragged"])
@pytest.mark.parametrize("weights", ["int8", "same-dtype"])
def test_gemv_folds_in_norm_swiglu_and_residual(config, weights):
    """The GEMV's input as RMSNorm(x) * norm, or silu(gate) * up, and a residual added to its output,
    for an int8 weight with its scale and for a weight in the activations' dtype: the exact fp64 result
    within fp32 rounding, and within a few bf16 steps in bf16."""
    from llmopt.kernels import gemv_with
    n, k = (64, 256) if config["BLOCK_N"] == 16 else (37, 300)
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    q, scale = quantize_int8(w)
    x, up, norm = 3 * torch.randn(k, generator=g), torch.randn(k, generator=g), 1 + torch.rand(k, generator=g)
    res = torch.randn(n, generator=g)
    xd = x.double()
    inputs = {"norm": xd / (xd.pow(2).mean() + 1e-5).sqrt() * norm.double(), "up": F.silu(xd) * up.double(),
              "plain": xd}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -6)):
        weight, s = (q, scale.to(dtype)) if weights == "int8" else (w.to(dtype), None)
        exact_w = q.double() * scale.to(dtype).double()[:, None] if weights == "int8" else w.to(dtype).double()
        for prologue in ("norm", "up", "plain"):
            for residual in (None, res):
                exact = exact_w @ inputs[prologue] + (0 if residual is None else res.double())
                extra = {"norm": {"norm": norm.to(dtype), "eps": 1e-5}, "up": {"up": up.to(dtype)}, "plain": {}}
                y = gemv_with(x.to(dtype), weight, s, config, **extra[prologue],
                              residual=None if residual is None else residual.to(dtype))
                assert y.dtype == dtype
                torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol * exact.abs().max().item(),
                                           msg=lambda m: f"{prologue}, residual {residual is not None}, {dtype}: {m}")
    with pytest.raises(ValueError, match="not both"):
        gemv_with(x, q, scale, config, up=up, norm=norm)
    with pytest.raises(ValueError, match=r"residual is \[N\] = \[%d\]" % n):
        gemv_with(x, q, scale, config, residual=up)
    with pytest.raises(ValueError, match="an int8 weight .* with scale .N., or a weight in x's dtype with scale None"):
        gemv_with(x, w.bfloat16(), None, config)


@interpreter
@pytest.mark.parametrize("kind", ["linear", "int8"])
def test_linear_gemv_folds_what_its_layer_does_around_it(kind):
    """linear_gemv, what FoldedBlock calls: the layer after an RMSNorm, after a SwiGLU, with a residual
    added, with and without a bias (Qwen2's q, k, v), equals the unfused modules' result."""
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    x, up = torch.randn(1, 1, 96), torch.randn(1, 1, 96)
    for bias in (False, True):
        layer = nn.Linear(96, 40, bias=bias)
        layer = layer if kind == "linear" else Int8Linear(layer)
        res = torch.randn(1, 1, 40)
        torch.testing.assert_close(linear_gemv(layer, x, norm=norm), layer(norm(x)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear_gemv(layer, x, up=up, residual=res), res + layer(F.silu(x) * up),
                                   rtol=1e-5, atol=1e-5)
        assert linear_gemv(layer, x).shape == (1, 1, 40)


def small_gemv_blocks(monkeypatch):
    """Large blocks for the tiny model's GEMVs: a handful of programs each, which Triton's interpreter
    runs in seconds (gemv_config picks many small ones, to fill a GPU)."""
    monkeypatch.setattr("llmopt.kernels.gemv_config",
                        lambda n, k, element_size=1: {"BLOCK_N": 128, "BLOCK_K": 256, "num_warps": 4})


def record_gemv_calls(monkeypatch) -> list:
    """Each GEMV call from now on, as the folded work it took: ("norm",), ("up", "residual"), ()..."""
    import llmopt.kernels as kernels
    calls, real = [], kernels.gemv_with
    monkeypatch.setattr(kernels, "gemv_with", lambda *a, **kw: calls.append(
        tuple(name for name in ("norm", "up", "residual") if kw.get(name) is not None)) or real(*a, **kw))
    return calls


@torch.no_grad()
def step_logits(model, tok):
    """The logits of one decode step over a static cache (the prompt's last token)."""
    ids = torch.tensor([tok.encode("ROMEO: But soft, what light")], device=model.device)
    cache = make_cache("static", model.config, 1, ids.shape[1] + 1, device=model.device, dtype=model.dtype)
    prefill(model, ids[:, :-1], cache)
    return decode_one_token(model, ids[:, -1:], torch.tensor([ids.shape[1] - 1], device=model.device), cache)


@interpreter
@pytest.mark.parametrize("case", ["int8-fused", "int8-separate", "fp32-fused"])
def test_folded_layers_decode_as_the_unfolded_ones(case, monkeypatch):
    """Every layer of the trained tiny model folded (int8 through quantize(kernel="triton-folded"), fp32
    through fold_layers): one-token steps run only GEMVs with the norms, SwiGLU and residual adds inside
    (and attention), with the unfolded model's logits and greedy tokens: static and dynamic caches, a
    padded batch and the engine (their batches and mixed steps take Block.forward, a lone row folds)."""
    small_gemv_blocks(monkeypatch)
    weights, layout = case.split("-")
    models = []
    for fold in (False, True):
        model, tok = llmopt.load_model("tiny")
        if layout == "fused":
            llmopt.fuse_projections(model)
        if weights == "int8":
            quantize(model, "int8", kernel="triton-folded" if fold else "auto")
        elif fold:
            fold_layers(model)
        models.append(model)
    ref, fast = models
    assert all(type(layer) is FoldedBlock for layer in fast.layers) and type(fast) is FoldedTransformer
    torch.testing.assert_close(step_logits(fast, tok), step_logits(ref, tok), rtol=1e-5, atol=1e-4)

    calls = record_gemv_calls(monkeypatch)
    prompts = ["ROMEO:", "JULIET:\nO Romeo, Romeo"]
    expect = [llmopt.generate(ref, tok, p, max_new_tokens=5, ignore_eos=True).token_ids for p in prompts]
    calls.clear()
    for cache in ("static", "dynamic"):
        assert [llmopt.generate(fast, tok, p, max_new_tokens=5, ignore_eos=True, cache=cache).token_ids
                for p in prompts] == expect
    # a step: q, k, v (one GEMV or three) from the normed stream; x + o(...); gate, up from the normed h;
    # h + down(silu(gate) * up); the int8 head (tied) one row through the GEMV with the final norm folded
    # in, prompt's and steps' (a full-precision head stays on F.linear, after the norm's own kernel)
    layer = [("norm",)] * (1 if layout == "fused" else 3) + [("residual",)] + \
        [("norm",)] * (1 if layout == "fused" else 2) + [("up", "residual")]
    head = [("norm",)] if weights == "int8" else []
    step = layer * 4 + head
    assert calls[:len(head) + len(step)] == head + step
    assert len(calls) == 2 * 2 * (len(head) + 4 * len(step))
    if case != "int8-fused":
        return
    assert [g.token_ids for g in llmopt.generate_batch(fast, tok, prompts, max_new_tokens=5, ignore_eos=True)] \
        == [g.token_ids for g in llmopt.generate_batch(ref, tok, prompts, max_new_tokens=5, ignore_eos=True)]
    lengths = [5, 3]
    for cuda_graphs in (False, True):   # paged mixed steps; the graph path's padded buckets (on a CPU, eager)
        calls.clear()
        engine = llmopt.Engine(fast, tok, max_batch_size=2, block_size=4, cuda_graphs=cuda_graphs)
        assert [g.token_ids for g in engine.generate_many(prompts, max_new_tokens=lengths, ignore_eos=True)] == \
            [e[:n] for e, n in zip(expect, lengths)]
        assert ("norm",) in calls       # the steps with one row left ran folded


@interpreter
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_folding_a_compiled_model_rebuilds_its_step(weights, monkeypatch):
    """The suite's path: torch.compile (each GEMV one opaque op), 4 steps a DecodeGraph; folding after a
    compiled run records the step again (the model's and a layer's class are part of the model's key),
    and unfolding too. An int8 head on the Triton GEMV takes the final norm in once folded."""
    small_gemv_blocks(monkeypatch)
    model, tok = llmopt.load_model("tiny")
    llmopt.fuse_projections(model)
    if weights == "int8":
        quantize(model, "int8", kernel="triton")
    run = lambda: llmopt.generate(model, tok, "ROMEO: But soft", max_new_tokens=6, ignore_eos=True,  # noqa: E731
                                  compile=True, graph_steps=4).token_ids
    want = run()
    calls = record_gemv_calls(monkeypatch)
    fold_layers(model)
    assert run() == want and ("up", "residual") in calls
    # a step's last GEMV: the int8 head with the final norm in it, or a full-precision model's last down
    assert calls[-1] == (("norm",) if weights == "int8" else ("up", "residual"))
    # each layer's step: two GEMVs with the norm (q,k,v and gate,up, fused), one down; the rest are heads
    heads = calls.count(("norm",)) - 2 * calls.count(("up", "residual"))
    calls.clear()
    unfold_layers(model)
    assert all(type(layer) is Block for layer in model.layers) and type(model) is Transformer
    assert run() == want
    if weights == "fp32":
        assert calls == [] and heads == 0
    else:   # every GEMV plain: the prompt's head, then each step's four a layer and its head
        assert set(calls) == {()} and len(calls) == heads + (heads - 1) * 4 * len(model.layers)


@interpreter
def test_a_compiled_folded_step_has_no_kernel_of_its_own_per_layer(monkeypatch):
    """What folding and the Triton attention leave of a compiled decode step (Inductor's code, on this
    CPU): per layer only llmopt's ops, four GEMVs and one attention that rotates, writes the cache in
    place and attends; the kernels Inductor generates (embedding, the rotary table, the final norm)
    are as many for two layers as for one, and no cache is copied."""
    import re

    from torch._inductor.utils import run_and_get_code
    small_gemv_blocks(monkeypatch)
    found = []
    for layers in (1, 2):
        model = llmopt.build_model(llmopt.get_config("tiny").replace(n_layers=layers))
        fold_layers(llmopt.fuse_projections(model)).set_attention("triton")
        cache = make_cache("static", model.config, 1, 16, dtype=model.dtype)
        with torch.no_grad():
            prefill(model, torch.tensor([[1, 2, 3]]), cache)
            step = torch.compile(lambda t, p: decode_one_token(model, t, p, cache), fullgraph=True)
            _, code = run_and_get_code(step, torch.tensor([[4]]), torch.tensor([3]))
        code = "\n".join(code)
        assert "clone" not in code and ".copy_(" not in code, code
        found.append((len(re.findall(r"^\s+cpp_fused_\w+\(", code, re.M)),
                      len(re.findall(r"= torch\.ops\.llmopt\.gemv\.default\(", code)),
                      len(re.findall(r"torch\.ops\.llmopt\.decode_attention_append\.default\(", code))))
    (kernels_1, gemv_1, attention_1), (kernels_2, gemv_2, attention_2) = found
    assert kernels_2 == kernels_1 and (gemv_2 - gemv_1, attention_2 - attention_1) == (4, 1), found


@interpreter
def test_fold_keeps_the_layers_it_cannot_run(monkeypatch):
    """A projection left in full precision by quantize's skip folds too (its weight in the activations'
    dtype); int4 layers stay Blocks, and a model with nothing to fold is an error."""
    small_gemv_blocks(monkeypatch)
    model, tok = llmopt.load_model("tiny")
    want = llmopt.generate(model, tok, "ROMEO:", max_new_tokens=4, ignore_eos=True).token_ids
    quantize(model, "int8", kernel="triton-folded", skip=("layers.1.mlp.down_proj",))
    assert all(type(layer) is FoldedBlock for layer in model.layers)
    assert type(model.layers[1].mlp.down_proj) is nn.Linear
    assert llmopt.generate(model, tok, "ROMEO:", max_new_tokens=4, ignore_eos=True).token_ids == want
    int4 = quantize(llmopt.build_model(llmopt.get_config("tiny")), "int4", group_size=32)
    with pytest.raises(ValueError, match="no layer to fold.*not int4"):
        fold_layers(int4)
    assert all(type(layer) is Block for layer in int4.layers)


def test_fold_layers_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="llmopt's own layers.*Sequential"):
        fold_layers(nn.Sequential(nn.Linear(8, 8)))
    if HAS_TRITON:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)    # a CPU without the interpreter
        with pytest.raises(ValueError, match="fold_layers runs on CUDA GPUs, not on 'cpu'.*leave the layers unfolded"):
            fold_layers(llmopt.build_model(llmopt.get_config("tiny")))


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, {"compile": True, "graph_steps": 8}], ids=["eager", "graph"])
def test_folded_bf16_on_cuda_decodes_close_to_unfolded(options):
    """On a GPU: bf16 folded (the GEMV on bf16 weights) gives logits within bf16 rounding of the unfolded
    model's, and fp32 folded the same greedy tokens (tiny, trained), eager and in llmopt's CUDA graph."""
    prompts = ["ROMEO:", "JULIET:\nWherefore art thou"]
    outs = {}
    for fold in (False, True):
        model, tok = llmopt.load_model("tiny", device="cuda", dtype="fp32")
        llmopt.fuse_projections(model)
        if fold:
            fold_layers(model)
        outs[fold] = [llmopt.generate(model, tok, p, max_new_tokens=40, ignore_eos=True, **options).token_ids
                      for p in prompts]
        if not options:
            model.to(torch.bfloat16)
            outs[fold, "logits"] = step_logits(model, tok).float()
    assert outs[True] == outs[False]
    if not options:
        torch.testing.assert_close(outs[True, "logits"], outs[False, "logits"], rtol=0.05, atol=0.25)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU")
def test_folded_triton_step_on_cuda_same_tokens_with_and_without_dependent_launch():
    """On a GPU: tiny (fp32, trained) with each layer's step all in llmopt's kernels (fused projections,
    folded layers, the Triton attention writing the static cache), compiled in llmopt's CUDA graph of 8
    steps, gives the same 150 tokens with its kernels launched as programmatic dependent launches as
    launched plainly (the same kernels: the same sums), the graph recorded again in between, and its
    first 40 are plain greedy's; on a Hopper GPU the launches are dependent ones."""
    from llmopt.kernels import dependent_launch, dependent_launches
    assert dependent_launch("cuda") == (torch.cuda.get_device_capability()[0] >= 9)
    prompts = ["ROMEO:", "JULIET:\nWherefore art thou"]
    model, tok = llmopt.load_model("tiny", device="cuda", dtype="fp32")
    greedy = [llmopt.generate(model, tok, p, max_new_tokens=40, ignore_eos=True).token_ids for p in prompts]
    fold_layers(llmopt.fuse_projections(model))
    model.set_attention("triton")
    outs = {}
    for on in (False, True, False, True):
        with dependent_launches(on):
            got = [llmopt.generate(model, tok, p, max_new_tokens=150, ignore_eos=True, compile=True,
                                   graph_steps=8).token_ids for p in prompts]
        assert outs.setdefault(on, got) == got, on          # and again after the other mode
    assert outs[True] == outs[False]
    assert [t[:40] for t in outs[False]] == greedy
