"""Weight-only quantization: error within half a step, exact packing, logits close, bytes counted."""
import importlib.util

import pytest
import torch
from torch import nn

import llmopt
from llmopt.quantize import (Int8Linear, dequantize_int4, dequantize_int8, model_bytes, pack_int4, quantize,
                             quantize_int4, quantize_int8, unpack_int4)


@pytest.fixture
def w():
    return torch.randn(96, 256, generator=torch.Generator().manual_seed(0))


def test_int8_round_trip_within_half_a_step(w):
    q, scale = quantize_int8(w)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert q.dtype == torch.int8 and q.abs().max() == 127


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_round_trip_within_half_a_step(w, group_size, symmetric):
    q, scale, zero = quantize_int4(w, group_size, symmetric)
    assert q.max() <= 15 and q.min() >= 0
    err = (dequantize_int4(q, scale, zero) - w).abs().reshape(96, -1, group_size)
    assert (err <= scale[..., None] / 2 + 1e-5).all()


def test_int4_packing_is_exact(w):
    q, _, _ = quantize_int4(w, 64)
    packed = pack_int4(q)
    assert packed.shape == (96, 128) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


def test_bad_options():
    m = llmopt.build_model(llmopt.get_config("tiny"))
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(m, "int3")
    with pytest.raises(ValueError, match="group_size must be"):
        quantize(m, "int4", group_size=48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(4, 40), 32)


def test_what_needs_full_precision_weights_refuses_a_quantized_model(tmp_path):
    """Quantizing twice, pruning, saving a Hugging Face checkpoint or handing the model to
    transformers after quantizing would be silently wrong: each says to do it before."""
    from llmopt import prune
    m = quantize(llmopt.build_model(llmopt.get_config("tiny")), "int8")
    for run, what in [(lambda: quantize(m, "int4"), "quantize"), (lambda: prune.magnitude_prune(m, 0.5), "pruning"),
                      (lambda: llmopt.save_model(m, tmp_path), "save_model"),
                      (lambda: llmopt.to_transformers(m), "to_transformers")]:
        with pytest.raises(ValueError, match=f"{what}.* needs full-precision weights.*already quantized \\(int8\\)"):
            run()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method,kw", [("int8", {}), ("int4", {"group_size": 32}),
                                       ("int4", {"group_size": 64, "symmetric": True})])
def test_fused_and_reference_paths_agree(method, kw):
    base = llmopt.build_model(llmopt.get_config("tiny"))
    ids = torch.randint(0, 4096, (2, 24))
    ref = quantize(llmopt.build_model(llmopt.get_config("tiny")), method, fused=False, **kw)
    fused = quantize(llmopt.build_model(llmopt.get_config("tiny")), method, fused=True, **kw)
    with torch.no_grad():
        full, a, b = base(ids), ref(ids), fused(ids)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # quantized logits stay close to full precision (random weights, std 0.02)
    rel = (a - full).norm() / full.norm()
    # per-weight relative error ~ (step / sqrt(12)) / std: ~1% int8, ~8% int4, ~11% symmetric int4;
    # it compounds over the layers
    bound = 0.05 if method == "int8" else (0.5 if kw.get("symmetric") else 0.3)
    assert rel < bound, rel


def test_cpu_int4_kernel_in_bf16_rounds_like_the_reference_path():
    """PyTorch's CPU int4 kernel with bf16 activations (fused=True, and the frozen decode's path)
    differs from the bf16 reference path by bf16 rounding only."""
    from llmopt.quantize import Int4Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    fused, ref = Int4Linear(lin, group_size=64, fused=True), Int4Linear(lin, group_size=64, fused=False)
    assert fused.fused and not ref.fused
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    want = ref(x).float()
    torch.testing.assert_close(fused(x).float(), want, atol=0.02 * want.abs().max().item(), rtol=0)


def test_model_bytes_and_ratios():
    cfg = llmopt.get_config("tiny")
    fp32 = model_bytes(llmopt.build_model(cfg))
    assert fp32 == cfg.n_params * 4
    int8 = model_bytes(quantize(llmopt.build_model(cfg), "int8"))
    int4 = model_bytes(quantize(llmopt.build_model(cfg), "int4", group_size=64))
    assert int8 / fp32 <= 0.27 and int4 / fp32 <= 0.16


def test_quantized_greedy_generation_runs_with_caches():
    m = quantize(llmopt.build_model(llmopt.get_config("tiny")), "int8")
    outs = [llmopt.generate(m, None, list(range(1, 9)), max_new_tokens=8, cache=c, ignore_eos=True).token_ids
            for c in ("none", "static")]
    assert outs[0] == outs[1]


def test_transformers_model_quantizes_too(hf_checkpoint):
    family, _, hf = hf_checkpoint
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        before = hf(ids).logits
        quantize(hf, "int8")
        after = hf(ids).logits
    assert (after - before).norm() / before.norm() < 0.02
    assert not any(isinstance(m, torch.nn.Linear) for m in hf.modules())


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_gpt2_conv1d_layers_quantize_too(gpt2, method):
    """GPT-2's projections are transformers' Conv1D (weight [in, out]): each becomes a quantized
    linear layer computing the same product, and a model with nothing to quantize is an error."""
    from transformers.pytorch_utils import Conv1D
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    layer = gpt2.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 64)
    with torch.no_grad():
        before, exact = gpt2(ids).logits, layer(x)
        quantize(gpt2, method, group_size=32)
        after, approx = gpt2(ids).logits, gpt2.transformer.h[0].mlp.c_fc(x)
    assert not any(isinstance(m, (Conv1D, nn.Linear)) for m in gpt2.modules())
    assert (approx - exact).norm() / exact.norm() < (0.01 if method == "int8" else 0.1)
    assert (after - before).norm() / before.norm() < (0.02 if method == "int8" else 0.2)
    with pytest.raises(ValueError, match="found no linear layers"):
        quantize(nn.Sequential(nn.ReLU()), "int8")


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_through_transformers(mode):
    pytest.importorskip("bitsandbytes")
    from llmopt.quantize import quantize_bnb
    ref, _ = llmopt.load_model("tiny")
    bnb = quantize_bnb("tiny", mode)
    ids = torch.randint(0, 4096, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids), bnb(ids).logits
    assert (b - a).norm() / a.norm() < 0.15
    assert model_bytes(bnb) < 0.6 * model_bytes(ref)
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize_bnb("tiny", "int2")


def test_cpu_dynamic_int8():
    from llmopt.quantize import quantize_dynamic_cpu
    ref, tok = llmopt.load_model("tiny")
    q = quantize_dynamic_cpu(llmopt.load_model("tiny")[0])
    ids = torch.randint(0, 4096, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids), q(ids)
    assert (b - a).norm() / a.norm() < 0.1
    assert 0.4 < model_bytes(q) / model_bytes(ref) < 0.6   # layers int8; the fp32 embedding stays
    # a bf16 model (most checkpoints) is cast to fp32 first: its kernels take fp32 activations
    half = quantize_dynamic_cpu(llmopt.load_model("tiny", dtype="bf16")[0])
    with torch.no_grad():
        c = half(ids)
    assert c.dtype == torch.float32 and (c - a).norm() / a.norm() < 0.1


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    import llmopt.quantize as q
    monkeypatch.setattr(q, "_importable", lambda name: name != "bitsandbytes")
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        q.quantize_bnb("tiny", "nf4")


def test_int8_compiled_decode_form_matches_the_reference():
    """Under torch.compile a decode row takes the multiply-and-sum form (fused, int8 read once);
    it gives the reference matmul's output, and whole generations agree token for token."""
    from llmopt.quantize import Int8Linear
    lin = Int8Linear(torch.nn.Linear(256, 96, bias=True))
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(lin)(x), lin(x), atol=1e-5, rtol=1e-5)
        x3 = torch.randn(2, 7, 256)            # prefill-sized input: the matmul form, compiled too
        torch.testing.assert_close(torch.compile(lin)(x3), lin(x3), atol=1e-5, rtol=1e-5)
    model = quantize(llmopt.build_model(llmopt.get_config("tiny")), "int8")
    prompt = list(range(3, 40))
    eager = llmopt.generate(model, None, prompt, max_new_tokens=10, ignore_eos=True)
    compiled = llmopt.generate(model, None, prompt, max_new_tokens=10, ignore_eos=True, compile=True)
    assert compiled.token_ids == eager.token_ids


def _frozen_steps_match_eager(model, tol: float) -> None:
    """Six decode steps of `model` compiled with frozen weights (CPU max-autotune) against the
    eager model from the same prefill: same greedy token, logits within `tol` of their scale."""
    from llmopt.generate import compiled_decode, decode_one_token, prefill
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    step = compiled_decode(model, "max-autotune")
    with torch.inference_mode():
        caches = [llmopt.make_cache("static", model.config, 1, 256, dtype=model.dtype) for _ in range(2)]
        for c in caches:
            prefill(model, ids, c)
        for t in range(12, 18):
            token, pos = torch.tensor([[t]]), torch.tensor([t])
            want = decode_one_token(model, token, pos, caches[0]).float()
            got = step(model, token, pos, caches[1]).float()
            assert got.argmax(-1).item() == want.argmax(-1).item()
            assert (got - want).abs().max() <= tol * want.abs().max()


def test_bf16_int8_frozen_decode_keeps_int8_weights_and_matches_eager(monkeypatch):
    """bf16 activations with int8 weights, compiled with frozen weights (CPU max-autotune):
    each step's logits match the eager bf16 int8 model's within bf16 rounding. Traced, a bf16
    CPU row goes through the packed op on the int8 weights (freezing would fold any
    dequantize-first form into a bf16 copy, twice the bytes)."""
    from llmopt.quantize import Int8Linear
    _frozen_steps_match_eager(quantize(llmopt.build_model(llmopt.get_config("tiny"), dtype=torch.bfloat16),
                                       "int8"), tol=0.05)
    lin = Int8Linear(torch.nn.Linear(64, 32).to(torch.bfloat16))
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    packed = torch._weight_int8pack_mm(x[0], lin.weight, lin.scale) + lin.bias
    assert torch.equal(lin(x)[0], packed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_frozen_decode_repacks_for_the_cpu_kernel_and_matches_eager(monkeypatch, dtype):
    """int4 weights, compiled with frozen weights (CPU max-autotune): the traced layer repacks
    its 4-bit codes into PyTorch's CPU int4 kernel layout (freezing folds that once), and each
    step's logits match the eager (dequantize-first) model's within the dtype's rounding."""
    from llmopt.quantize import Int4Linear, frozen_weights
    tol = 0.05 if dtype == torch.bfloat16 else 1e-3
    _frozen_steps_match_eager(quantize(llmopt.build_model(llmopt.get_config("tiny"), dtype=dtype), "int4",
                                       group_size=64), tol)
    # the traced branch itself: same result as the reference path up to the dtype's rounding,
    # taken only while the weights are frozen
    lin = Int4Linear(torch.nn.Linear(128, 48).to(dtype), group_size=32)
    x = torch.randn(2, 1, 128, dtype=dtype)
    ref = lin(x)
    calls = []
    kernel = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(lin(x), ref) and not calls          # not frozen: the reference path
    with frozen_weights():
        got = lin(x)
    assert len(calls) == 1 and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=0)


# Triton's CPU interpreter (conftest turns it on where there is no GPU; on a GPU the CUDA test below runs)
triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                 reason="needs Triton, and runs its CPU interpreter where there is no GPU")


@triton_only
@pytest.mark.parametrize("n, k, config", [
    (48, 96, {"BLOCK_N": 1, "BLOCK_K": 128, "num_warps": 2}),      # one output a program, K masked
    (64, 512, {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4}),    # whole blocks: the unmasked loop
    (37, 300, {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 2}),      # ragged N and K
])
def test_triton_int8_gemv_matches_the_reference(n, k, config):
    """llmopt's Triton GEMV (in Triton's CPU interpreter) computes (q @ x) * scale: within fp32
    rounding of the exact sum, and within one bf16 step of it for bf16 activations."""
    from llmopt.kernels import gemv_with
    g = torch.Generator().manual_seed(n * k)
    q, scale = quantize_int8(torch.randn(n, k, generator=g))
    x = torch.randn(k, generator=g)
    exact = (q.double() @ x.double()) * scale.double()
    y = gemv_with(x, q, scale, config)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5)
    yb = gemv_with(x.bfloat16(), q, scale.bfloat16(), config)
    exact_b = (q.double() @ x.bfloat16().double()) * scale.bfloat16().double()
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.double(), exact_b, rtol=2 ** -7, atol=1e-3)


@triton_only
def test_int8_layers_decode_one_row_through_the_triton_kernel(monkeypatch):
    """quantize(..., kernel="triton"): a one-row input goes through the custom op (also under
    torch.compile, as one opaque op) and equals the reference path; longer inputs keep the
    reference path."""
    from llmopt.kernels import gemv_config
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    ref, fast = Int8Linear(lin), Int8Linear(lin, kernel="triton")
    one, rows = torch.randn(1, 1, 96), torch.randn(3, 96)
    assert torch.allclose(fast(one), ref(one), atol=1e-5) and fast(one).shape == (1, 1, 40)
    assert torch.equal(fast(rows), ref(rows))
    calls = []
    monkeypatch.setattr("llmopt.kernels.gemv_config", lambda n, k, es=1: calls.append((n, k)) or gemv_config(n, k, es))
    fast(one)
    assert calls == [(40, 96)]
    compiled = torch.compile(lambda x: fast(x), fullgraph=True)
    assert torch.allclose(compiled(one), ref(one), atol=1e-5)


def test_triton_kernel_option_is_checked():
    model = llmopt.build_model(llmopt.get_config("tiny"))
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'triton', 'triton-folded'\)"):
        quantize(model, "int8", kernel="cuda")
    with pytest.raises(ValueError, match="int8 kernel"):
        quantize(model, "int4", kernel="triton")
    with pytest.raises(ValueError, match="int8 kernel"):
        quantize(model, "int4", kernel="triton-folded")
    with pytest.raises(ValueError, match="llmopt's own layers.*this is a Sequential: use kernel='triton'"):
        quantize(nn.Sequential(nn.Linear(8, 8)), "int8", kernel="triton-folded")
    if importlib.util.find_spec("triton") is not None:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TRITON_INTERPRET", raising=False)    # a CPU without the interpreter
            with pytest.raises(ValueError, match="runs on CUDA GPUs, not on 'cpu'"):
                quantize(model, "int8", kernel="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, {"compile": True, "graph_steps": 8}])
def test_triton_int8_decode_on_cuda_matches_the_reference_path(options):
    """On a GPU: int8 through the Triton GEMV gives the reference int8 path's greedy tokens (the
    trained tiny model, fp32 activations), eager and compiled inside llmopt's CUDA graph, and so do
    the layers with norms, SwiGLU and adds folded into it ("triton-folded", fused projections; the
    interpreter's tests also run them separate); the kernel's [N] output matches the exact product on
    the 1B model's shapes."""
    from llmopt.kernels import gemv
    prompts = ["ROMEO:", "JULIET:\nWherefore art thou"]
    outs = {}
    for kernel, fuse in (("auto", False), ("triton", False), ("triton-folded", True)):
        model, tok = llmopt.load_model("tiny", device="cuda", dtype="fp32")
        quantize(llmopt.fuse_projections(model) if fuse else model, "int8", kernel=kernel)
        outs[kernel, fuse] = [llmopt.generate(model, tok, p, max_new_tokens=40, ignore_eos=True,
                                              **options).token_ids for p in prompts]
    assert all(out == outs["auto", False] for out in outs.values())
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((3072, 2048), (2048, 8192), (128256, 2048)):
        q, scale = quantize_int8(torch.randn(n, k, device="cuda", generator=g))
        x, norm = torch.randn(k, device="cuda", generator=g), torch.rand(k, device="cuda", generator=g)
        res = torch.randn(n, device="cuda", generator=g)
        exact = (q.double() @ x.double()) * scale.double()
        assert torch.allclose(gemv(x, q, scale).double(), exact, rtol=1e-4, atol=1e-3)
        normed = x.double() / (x.double().pow(2).mean() + 1e-5).sqrt() * norm.double()
        exact = (q.double() @ normed) * scale.double() + res.double()
        assert torch.allclose(gemv(x, q, scale, norm=norm, eps=1e-5, residual=res).double(), exact,
                              rtol=1e-4, atol=1e-3)
