"""llmopt's Triton decode attention (kernels.decode_attention), and every Triton kernel compiled for an H100.

Without a GPU the kernels run in Triton's CPU interpreter (conftest turns it on); on a GPU the same
numeric tests run on the card (their ids say "cuda"). The interpreter cannot catch what only the GPU
compiler sees (a construct Triton cannot lower, a tile tl.dot refuses), so every kernel is also
compiled here for sm_90 with Triton's own compiler and its bundled ptxas, which need no GPU.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmopt

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON,
                                  reason="needs Triton (with PyTorch's CUDA builds, or pip install triton)")


def reference_attention(q, k, v, mask):
    """The same attention in fp64 through SDPA's math: the answer both precisions are held to."""
    additive = None
    if mask is not None:
        additive = mask.double() if mask.dtype != torch.bool else \
            torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).masked_fill_(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=additive,
                                          enable_gqa=q.shape[1] != k.shape[1])


def additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


# (B, H, Hkv, S, D, mask): grouped-query with a group of 2 and of 3 (padded to the tile), one kv head
# for all, multi-head; keys not a multiple of the 64-key block; head dims of 16, 24 (padded), 32, 64
CASES = [
    (2, 4, 2, 37, 16, "rows"),       # a mask per row, with holes and the unwritten end of a static cache
    (1, 6, 2, 130, 32, "shared"),    # one [1, 1, 1, S] mask for every row
    (3, 4, 4, 200, 64, "2d"),        # the [1, S] mask Transformer.layer_inputs makes for a plain cache
    (1, 8, 1, 64, 24, None),         # no mask: every key
    (2, 14, 2, 300, 128, "rows"),    # Qwen2.5-0.5B's group of 7 and a head dim of 128
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=["rows", "shared", "2d", "nomask", "group7-d128"])
@pytest.mark.parametrize("device", [DEVICE], ids=[DEVICE if DEVICE == "cuda" else "interpreter"])
def test_decode_attention_matches_sdpa(case, dtype, device):
    """One split and several (each split's share weighed by its log-sum-exp; a split whose keys are
    all hidden adds nothing): the exact attention within fp32 rounding, or within bf16 rounding of it."""
    from llmopt.kernels import decode_attention, decode_attention_config, decode_attention_with
    B, H, Hkv, S, D, how = case
    g = torch.Generator().manual_seed(B * S + D)
    q = torch.randn(B, 1, H, D, generator=g).to(device, dtype).transpose(1, 2)   # as Attention makes it
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(device, dtype) for _ in range(2))
    keep = torch.rand(B if how == "rows" else 1, 1, 1, S, generator=g) < 0.6
    keep[..., 0], keep[..., S - 20:] = True, False
    mask = None if how is None else additive(keep, dtype).to(device)
    if how == "2d":
        mask = mask[0, 0]
    exact = reference_attention(q, k, v, mask)
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
           torch.float16: dict(atol=3e-3, rtol=3e-3)}[dtype]
    splits = set()
    for processors in (1, 64):
        cfg = decode_attention_config(B, Hkv, H // Hkv, S, D, processors)
        splits.add(cfg["SPLITS"])
        out = decode_attention_with(q, k, v, mask, cfg)
        assert out.dtype == dtype and out.shape == (B, H, 1, D)
        torch.testing.assert_close(out.double(), exact, **tol)
    assert 1 in splits and (S <= 64 or len(splits) == 2)
    torch.testing.assert_close(decode_attention(q, k, v, mask).double(), exact, **tol)


@needs_triton
def test_decode_attention_never_reads_hidden_keys():
    """Keys the mask hides do not count, whatever they hold (NaN included: a whole hidden block is
    skipped, so the unwritten end of a static cache is never read), and a boolean mask is the
    additive one."""
    from llmopt.kernels import decode_attention, decode_attention_config, decode_attention_with
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((2, 4, 1, 16), (2, 2, 192, 16),
                                                                          (2, 2, 192, 16)))
    keep = torch.zeros(2, 1, 1, 192, dtype=torch.bool, device=DEVICE)
    keep[0, ..., :100], keep[1, ..., 3:40] = True, True
    out = decode_attention(q, k, v, keep)
    torch.testing.assert_close(out, decode_attention(q, k, v, additive(keep, torch.float32)))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, keep), atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[..., 128:, :] = float("nan")       # blocks of keys no row may see
    v2[1, :, 64:128] = 1e4                # a block row 1 may not see (row 0 may)
    v2[1, :, :3] = -1e4                   # hidden keys inside a visible block
    out2 = decode_attention(q, k2, v2, keep)
    torch.testing.assert_close(out2[1], out[1])
    assert not out2.isnan().any()
    for cfg in (decode_attention_config(2, 2, 2, 192, 16, 1), decode_attention_config(2, 2, 2, 192, 16, 64)):
        torch.testing.assert_close(decode_attention_with(q, k2, v2, keep, cfg)[1], out[1])


@needs_triton
def test_decode_attention_stops_at_each_rows_last_slot():
    """`last`: each row sees the keys up to its slot (a decode step over a cache), alone or with a mask,
    one split or several (splits past the slot read nothing): the same as the equivalent mask."""
    from llmopt.kernels import decode_attention, decode_attention_config, decode_attention_with
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((3, 4, 1, 32), (3, 2, 260, 32),
                                                                          (3, 2, 260, 32)))
    last = torch.tensor([0, 70, 259], device=DEVICE)
    slots = torch.arange(260, device=DEVICE)
    upto = (slots[None, :] <= last[:, None])[:, None, None]                     # [3, 1, 1, 260]
    keep = torch.rand(3, 1, 1, 260, generator=g).to(DEVICE) < 0.7
    keep[..., 0] = True
    for mask, seen in ((None, upto), (additive(keep, torch.float32), upto & keep)):
        exact = reference_attention(q, k, v, seen)
        torch.testing.assert_close(decode_attention(q, k, v, mask, last).double(), exact, atol=1e-5, rtol=1e-5)
        for processors in (1, 64):
            cfg = decode_attention_config(3, 2, 2, 260, 32, processors)
            torch.testing.assert_close(decode_attention_with(q, k, v, mask, cfg, last).double(), exact,
                                       atol=1e-5, rtol=1e-5)
    one = torch.tensor([70], device=DEVICE)        # one slot for every row, as generate passes input_pos
    torch.testing.assert_close(decode_attention(q, k, v, None, one).double(),
                               reference_attention(q, k, v, (slots <= 70)[None, None, None]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="last slot is an integer tensor"):
        decode_attention(q, k, v, None, torch.tensor([1.5], device=DEVICE))


@needs_triton
def test_decode_attention_rejects_what_it_does_not_compute():
    from llmopt.kernels import decode_attention
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match=r"q \[B, H, 1, D\].*got q \(1, 4, 2, 16\)"):
        decode_attention(torch.randn(1, 4, 2, 16), k, k, None)        # two query rows: that is SDPA's
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        decode_attention(torch.randn(1, 3, 1, 16), k, k, None)
    with pytest.raises(ValueError, match=r"mask \(1, 4, 1, 10\)"):
        decode_attention(q, k, k, torch.zeros(1, 4, 1, 10))           # a mask per head


@needs_triton
def test_decode_attention_is_one_op_under_torch_compile():
    from llmopt.kernels import decode_attention
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((1, 4, 1, 16), (1, 2, 70, 16),
                                                                          (1, 2, 70, 16)))
    mask = additive(torch.arange(70, device=DEVICE) < 50, torch.float32)[None]
    compiled = torch.compile(lambda *a: decode_attention(*a) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), decode_attention(q, k, v, mask) * 2)


def rotary_inputs(B, H, Hkv, S, D, dtype, seed):
    """A static cache's decode step as Attention.attend receives it: q, k, v as projected, the token's
    rotary row (a position per row, as a left-padded batch has), caches full of earlier keys."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, 1, n * D, generator=g).to(DEVICE, dtype) for n in (H, Hkv, Hkv))
    angle = torch.rand(B, 1, 1, D // 2, generator=g) * 100
    angle = torch.cat([angle, angle], dim=-1)
    cos, sin = angle.cos().to(DEVICE, dtype), angle.sin().to(DEVICE, dtype)
    k_cache, v_cache = (torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, v, cos, sin, k_cache, v_cache


def appended_reference(q, k, v, cos, sin, k_cache, v_cache, pos, keep):
    """In fp64: rotate q and k (model.rotate_half), write k, v at slot `pos`, attend over `keep`'s keys."""
    from llmopt.model import rotate_half
    B, Hkv, S, D = k_cache.shape
    q, k, v = (t.double().view(B, 1, -1, D).transpose(1, 2) for t in (q, k, v))
    cos, sin = cos.double(), sin.double()
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k_all, v_all = k_cache.double().clone(), v_cache.double().clone()
    k_all[:, :, pos], v_all[:, :, pos] = k[:, :, 0], v[:, :, 0]
    out = reference_attention(q, k_all, v_all, keep)
    return out.transpose(1, 2).reshape(B, 1, -1), k_all, v_all


# (B, H, Hkv, S, D, the token's slot, a mask per row): the slot first, mid-split, on a split's first
# key, last; a group of 3 and of 7 (padded), head dims 16, 24 (padded), 32, 128
APPEND_CASES = [(1, 8, 4, 200, 32, 130, False), (2, 6, 2, 70, 16, 0, True), (1, 4, 4, 300, 64, 256, False),
                (2, 6, 2, 130, 24, 129, True), (1, 14, 2, 100, 128, 77, False)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", APPEND_CASES, ids=["slot130", "slot0-rows", "slot256", "d24-rows", "group7"])
@pytest.mark.parametrize("device", [DEVICE], ids=[DEVICE if DEVICE == "cuda" else "interpreter"])
def test_decode_attention_append_is_rotary_cache_write_and_attention(case, dtype, device):
    """`decode_attention_append`: q and k rotated, k and v written at the token's slot (nothing else in
    the caches changes), and attention over the keys up to it, the new one included: the exact answer
    within fp32 rounding (bf16: within its rounding, each cache entry within one rounding step), one
    split and several. What the caches held at the slot and after it is never read."""
    from llmopt.kernels import decode_attention_append, decode_attention_append_with, decode_attention_config
    B, H, Hkv, S, D, pos, rows = case
    q, k, v, cos, sin, k_cache, v_cache = rotary_inputs(B, H, Hkv, S, D, dtype, seed=S + D)
    keep = (torch.arange(S, device=DEVICE) <= pos).expand(B, 1, 1, S).clone()
    if rows:    # a padded batch: holes before the slot, the slot itself always seen
        keep &= torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(pos)).to(DEVICE) < 0.6
        keep[..., pos] = True
    mask = additive(keep, dtype) if rows else None
    exact, k_exact, v_exact = appended_reference(q, k, v, cos, sin, k_cache, v_cache, pos, keep)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for t in (k_cache, v_cache, k_exact, v_exact):
        t[:, :, pos + 1:] = float("nan")    # the unwritten end, and the token's slot below: never read
    k_cache[:, :, pos], v_cache[:, :, pos] = float("nan"), float("nan")
    splits = set()
    for processors in (1, 64):
        cfg = decode_attention_config(B, Hkv, H // Hkv, S, D, processors)
        splits.add(cfg["SPLITS"])
        kc, vc = k_cache.clone(), v_cache.clone()
        out = decode_attention_append_with(q, k, v, cos, sin, kc, vc, torch.tensor([pos], device=DEVICE), mask, cfg)
        assert out.shape == (B, 1, H * D) and out.dtype == dtype
        torch.testing.assert_close(out.double(), exact, **tol)
        written = torch.zeros(S, dtype=torch.bool, device=DEVICE)
        written[pos] = True
        for cache, want in ((kc, k_exact), (vc, v_exact)):
            torch.testing.assert_close(cache[:, :, ~written].double(), want[:, :, ~written], equal_nan=True,
                                       atol=0, rtol=0)
            step = 1e-6 if dtype == torch.float32 else 2 ** -7 * want[:, :, pos].abs().clamp(min=1)
            assert ((cache[:, :, pos].double() - want[:, :, pos]).abs() <= step).all()
    assert 1 in splits and len(splits) == 2
    kc, vc = k_cache.clone(), v_cache.clone()
    torch.testing.assert_close(decode_attention_append(q, k, v, cos, sin, kc, vc, torch.tensor([pos], device=DEVICE),
                                                       mask).double(), exact, **tol)


@needs_triton
def test_decode_attention_append_is_in_place_under_torch_compile():
    """Compiled, the op writes into the caches it is given (a functional copy of each layer's cache
    every step would cost more than the kernel saves): Inductor's code calls it on them, clones nothing."""
    from torch._inductor.utils import run_and_get_code

    from llmopt.kernels import decode_attention_append
    q, k, v, cos, sin, k_cache, v_cache = rotary_inputs(1, 4, 2, 96, 16, torch.float32, seed=3)
    pos = torch.tensor([40], device=DEVICE)

    def layers(q, k, v, cos, sin, caches, pos):     # two layers, as a decode step runs them
        for kc, vc in caches:
            q = decode_attention_append(q.sin(), k, v, cos, sin, kc, vc, pos)
        return q
    eager = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    compiled = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    want = layers(q, k, v, cos, sin, eager, pos)
    got, code = run_and_get_code(torch.compile(layers, fullgraph=True), q, k, v, cos, sin, compiled, pos)
    torch.testing.assert_close(got, want)
    for (kc, vc), (ke, ve) in zip(compiled, eager):
        torch.testing.assert_close(kc, ke, atol=0, rtol=0)
        torch.testing.assert_close(vc, ve, atol=0, rtol=0)
    code = "\n".join(code)
    assert code.count("llmopt.decode_attention_append") >= 2 and "clone" not in code, code


@needs_triton
def test_decode_attention_append_rejects_what_it_does_not_compute():
    from llmopt.kernels import decode_attention_append
    q, k, v, cos, sin, k_cache, v_cache = rotary_inputs(1, 4, 2, 32, 16, torch.float32, seed=4)
    pos = torch.tensor([5])
    with pytest.raises(ValueError, match=r"q \[B, 1, H\*D\].*got q \(1, 2, 64\)"):
        decode_attention_append(q.expand(1, 2, 64), k, v, cos, sin, k_cache, v_cache, pos)  # two tokens
    with pytest.raises(ValueError, match="caches in q's dtype"):
        decode_attention_append(q, k, v, cos, sin, k_cache.half(), v_cache.half(), pos)
    with pytest.raises(ValueError, match=r"an integer tensor \[1\]"):
        decode_attention_append(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([5, 6]))
    with pytest.raises(ValueError, match=r"got mask \(1, 4, 1, 32\)"):
        decode_attention_append(q, k, v, cos, sin, k_cache, v_cache, pos, torch.zeros(1, 4, 1, 32))


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's model run (on a GPU: the cuda test below)")
def test_triton_attention_decodes_as_sdpa_does(monkeypatch):
    """`set_attention("triton")`: every one-token step of the trained tiny model goes through the kernel
    (prompts keep SDPA), with the greedy tokens of SDPA: static caches (rotary and the cache write in the
    kernel too), dynamic ones, and a left-padded batch (a mask per row)."""
    import llmopt.kernels as kernels
    model, tok = llmopt.load_model("tiny")
    prompts = ["ROMEO:", "JULIET:\nO Romeo, Romeo"]
    ref = [llmopt.generate(model, tok, p, max_new_tokens=6, ignore_eos=True).token_ids for p in prompts]
    ref_batch = llmopt.generate_batch(model, tok, prompts, max_new_tokens=6, ignore_eos=True)
    calls = []
    attend, append = kernels.decode_attention_with, kernels.decode_attention_append_with
    monkeypatch.setattr(kernels, "decode_attention_with",
                        lambda *a: calls.append(("attend", a[0].shape[2], a[3] is None, a[5] is not None))
                        or attend(*a))
    monkeypatch.setattr(kernels, "decode_attention_append_with",
                        lambda *a: calls.append(("append", a[0].shape[1], a[8] is None)) or append(*a))
    model.set_attention("triton")
    steps = 2 * 5 * model.config.n_layers      # two prompts, five one-token steps each, every layer
    for cache, call in (("static", ("append", 1, True)), ("dynamic", ("attend", 1, True, True))):
        assert [llmopt.generate(model, tok, p, max_new_tokens=6, ignore_eos=True, cache=cache).token_ids
                for p in prompts] == ref
        # one query row, and the token's slot instead of a mask (no [1, S] mask to compute again per layer)
        assert len(calls) == steps and set(calls) == {call}, cache
        calls.clear()
    assert [g.token_ids for g in llmopt.generate_batch(model, tok, prompts, max_new_tokens=6, ignore_eos=True)] \
        == [g.token_ids for g in ref_batch]
    assert calls and set(calls) == {("append", 1, False)}        # a padded batch: a mask per row


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's model run (on a GPU: the cuda test below)")
def test_triton_attention_compiled_on_the_graph_path():
    """The suite's path: the decode step through torch.compile (the kernel one opaque op in its graph),
    4 steps a `DecodeGraph` (on a CPU run one by one): SDPA's greedy tokens."""
    model, tok = llmopt.load_model("tiny")
    ref = llmopt.generate(model, tok, "ROMEO: But soft", max_new_tokens=10, ignore_eos=True).token_ids
    model.set_attention("triton")
    assert llmopt.generate(model, tok, "ROMEO: But soft", max_new_tokens=10, ignore_eos=True, compile=True,
                           graph_steps=4).token_ids == ref


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's model run")
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["paged", "graph-buckets"])
def test_triton_attention_in_the_engine(cuda_graphs, monkeypatch):
    """The engine's decode rows through the kernel: a paged cache gathered into order (mixed steps: the
    decode rows' group with a boolean mask), and the graph path's padded buckets (a mask per query row):
    every request gets its unbatched greedy tokens."""
    import llmopt.kernels as kernels
    calls, real = [], kernels.decode_attention_with
    monkeypatch.setattr(kernels, "decode_attention_with", lambda *a: calls.append(a[3].dtype) or real(*a))
    model, tok = llmopt.load_model("tiny")
    prompts, lengths = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:", "KING"], [6, 3, 5, 4]
    ref = [llmopt.generate(model, tok, p, max_new_tokens=n, ignore_eos=True).token_ids
           for p, n in zip(prompts, lengths)]
    model.set_attention("triton")
    engine = llmopt.Engine(model, tok, max_batch_size=2, block_size=4, cuda_graphs=cuda_graphs)
    out = engine.generate_many(prompts, max_new_tokens=lengths, ignore_eos=True)
    assert [g.token_ids for g in out] == ref
    assert any(s["rows"] and s["prefills"] for s in engine.step_log)     # mixed steps ran
    assert len(calls) >= model.config.n_layers * (max(lengths) - 1)
    assert (torch.bool in calls) == (not cuda_graphs)     # a mixed step's decode group: a boolean mask


def test_set_attention_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    model = llmopt.build_model(llmopt.get_config("tiny"))
    with pytest.raises(ValueError, match="attention backend must be one of"):
        model.set_attention("flash")
    if HAS_TRITON:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)    # a CPU without the interpreter
        with pytest.raises(ValueError, match=r"set_attention\('triton'\) runs on CUDA GPUs, not on 'cpu'.*use 'sdpa'"):
            model.set_attention("triton")
    assert model.layers[0].self_attn.backend == "sdpa"
    if HAS_TRITON:      # a model moved to the CPU after choosing the kernel
        from llmopt.kernels import decode_attention
        with pytest.raises(ValueError, match="Triton decode attention runs on CUDA GPUs.*set_attention\\('sdpa'\\)"):
            decode_attention(torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), None)


class RecordedLaunches:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the keyword arguments."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


@needs_triton
def test_dependent_launch_only_where_the_gpu_and_triton_have_it(monkeypatch):
    """Programmatic dependent launch needs compute capability 9.0 (Hopper) and a Triton with grid
    dependency control; never on a CPU or in the interpreter, and `set_dependent_launch` turns it off
    (`dependent_launches` for a `with` block)."""
    import llmopt.kernels as kernels
    assert not kernels.dependent_launch("cpu")
    if kernels.interpreting():
        assert not kernels.dependent_launch("cuda")     # the interpreter has no grid dependency control
    has_it = kernels._gpu_has_dependent_launch.__wrapped__
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert not has_it(0)                                # an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert has_it(0)                                    # an H100, with this Triton (3.4 or later)
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_gpu_has_dependent_launch", lambda index: True)
    previous = kernels.set_dependent_launch(True)
    try:
        assert kernels.dependent_launch("cuda:0")
        with pytest.raises(RuntimeError), kernels.dependent_launches(False):    # for a while, errors too
            assert not kernels.dependent_launch("cuda:0")
            raise RuntimeError
        assert kernels.dependent_launch("cuda:0")
        assert kernels.set_dependent_launch(False) is True and not kernels.dependent_launch("cuda:0")
    finally:
        kernels.set_dependent_launch(previous)


@needs_triton
def test_kernels_launch_as_dependent_launches_when_asked(monkeypatch):
    """The GEMV, the decode attention and its combine all pass PDL (their grid dependency control) and
    Triton's launch_pdl together, or neither."""
    import llmopt._attention_kernel as attention_kernels
    import llmopt._gemv_kernel as gemv_kernels
    import llmopt.kernels as kernels
    launches = {name: RecordedLaunches() for name in ("gemv", "attention", "combine")}
    monkeypatch.setattr(gemv_kernels, "gemv_kernel", launches["gemv"])
    monkeypatch.setattr(attention_kernels, "decode_attention_kernel", launches["attention"])
    monkeypatch.setattr(attention_kernels, "combine_kernel", launches["combine"])
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 300, 16)
    config = kernels.decode_attention_config(1, 2, 2, 300, 16)
    assert config["SPLITS"] > 1
    for on in (True, False):
        monkeypatch.setattr(kernels, "dependent_launch", lambda device, on=on: on)
        kernels.gemv_with(torch.randn(32), torch.randn(8, 32), None, {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2})
        kernels.decode_attention_with(q, k, k, None, config)
        for name, launch in launches.items():
            kwargs = launch.calls.pop()
            assert kwargs["PDL"] is on and kwargs.get("launch_pdl", False) is on, (name, kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, {"compile": True, "graph_steps": 8}], ids=["eager", "graph"])
def test_triton_attention_on_cuda_decodes_as_sdpa_does(options):
    """On a GPU: the trained tiny model in fp32 decodes the same greedy tokens through the kernel as
    through SDPA, eager and compiled inside llmopt's CUDA graph."""
    prompts = ["ROMEO:", "JULIET:\nWherefore art thou"]
    outs = {}
    for backend in ("sdpa", "triton"):
        model, tok = llmopt.load_model("tiny", device="cuda", dtype="fp32")
        model.set_attention(backend)
        outs[backend] = [llmopt.generate(model, tok, p, max_new_tokens=40, ignore_eos=True, **options).token_ids
                         for p in prompts]
    assert outs["triton"] == outs["sdpa"]


# ---- compiled for an H100 without one -------------------------------------------------------------
# In a process of its own: with the interpreter on (conftest), @triton.jit makes functions that only
# interpret. `python tests/test_kernels.py` prints, for each kernel variant, what its PTX holds.

def compile_for_h100(kernel, constexprs: dict, types: dict, aligned=()) -> str:
    """PTX of `kernel` for sm_90, as Triton's JIT would build it on an H100: `types` gives each runtime
    argument's type (the rest i32); `aligned` names the arguments the JIT would find divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": 4, **({"launch_pdl": True} if constexprs.get("PDL") else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def features(ptx: str) -> dict:
    """What a kernel's PTX holds: tensor cores (mma.sync), 16-byte loads (ld.global.v4), stores; the
    grid dependency control of a dependent launch (griddepcontrol.wait, .launch_dependents) and how
    many global loads come before the wait."""
    wait = ptx.find("griddepcontrol.wait")
    return {"mma": "mma.sync" in ptx, "v4": "ld.global.v4" in ptx, "store": "st.global" in ptx,
            "wait": wait >= 0, "launch": "griddepcontrol.launch_dependents" in ptx,
            "loads_before_wait": ptx[:wait].count("ld.global") if wait >= 0 else None}


def ptx_features() -> dict:
    """Every kernel variant an H100 runs, compiled for sm_90 as a dependent launch (PDL), and the GEMV
    launched plainly (a GPU before Hopper, or `set_dependent_launch(False)`): `features` of each."""
    from llmopt._attention_kernel import combine_kernel, decode_attention_kernel
    from llmopt._gemv_kernel import gemv_kernel
    from llmopt.kernels import gemv_config
    out = {}
    aligned = ("q_ptr", "k_ptr", "v_ptr", "mask_ptr", "out_ptr", "lse_ptr", "kn_ptr", "vn_ptr", "cos_ptr",
               "sin_ptr", "sq_b", "sq_h", "sk_b", "sk_h", "sk_s", "sv_b", "sv_h", "sv_s", "sm_b", "skn_b", "svn_b",
               "sc_b")
    # a batch's mask, one split; generate's decode (the token's slot, no mask), splits; fp32 with both;
    # a static cache's decode step with rotary and the cache write inside (append), splits, and a padded
    # batch's (append with a mask), one split
    for dtype, one_split, has_mask, has_last, append in (
            ("bf16", True, True, False, False), ("bf16", False, False, True, False), ("fp32", False, True, True, False),
            ("bf16", False, False, False, True), ("bf16", True, True, False, True)):
        part = dtype if one_split else "fp32"
        types = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "mask_ptr": f"*{dtype}",
                 "last_ptr": "*i64", "out_ptr": f"*{part}", "lse_ptr": f"*{part}", "kn_ptr": f"*{dtype}",
                 "vn_ptr": f"*{dtype}", "cos_ptr": f"*{dtype}", "sin_ptr": f"*{dtype}", "scale": "fp32"}
        name = f"attention-{dtype}-{'one' if one_split else 'splits'}{'-append' if append else ''}"
        out[name] = features(compile_for_h100(
            decode_attention_kernel, dict(G=4, D=64, BLOCK_G=16, BLOCK_S=64, BLOCK_D=64, ONE_SPLIT=one_split,
                                          HAS_MASK=has_mask, HAS_LAST=has_last, APPEND=append,
                                          IEEE=dtype == "fp32", UPCAST=False, PDL=True), types, aligned))
        out[f"combine-{dtype}"] = features(compile_for_h100(
            combine_kernel, dict(D=64, BLOCK_SPLITS=8, BLOCK_D=64, PDL=True),
            {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dtype}"}))
    # the GEMV on int8 weights: plain; with the norm before it (q, k, v and gate, up of a folded layer);
    # with the SwiGLU before it and the residual after (its down projection); and on bf16 weights, folded
    for name, weight, swiglu, norm, pdl in (
            ("gemv-int8", "i8", False, False, True), ("gemv-int8-norm", "i8", False, True, True),
            ("gemv-int8-swiglu-residual", "i8", True, False, True), ("gemv-bf16-norm", "bf16", False, True, True),
            ("gemv-bf16-swiglu-residual", "bf16", True, False, True), ("gemv-int8-plain-launch", "i8", False, False,
                                                                        False)):
        cfg = gemv_config(16384, 2048, 1 if weight == "i8" else 2)
        types = {"x_ptr": "*bf16", "w_ptr": f"*{weight}", "s_ptr": "*bf16", "y_ptr": "*bf16", "up_ptr": "*bf16",
                 "norm_ptr": "*bf16", "res_ptr": "*bf16", "eps": "fp32"}
        out[name] = features(compile_for_h100(
            gemv_kernel, dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], EVEN=True, SCALE=weight == "i8",
                              SWIGLU=swiglu, NORM=norm, RESIDUAL=swiglu, PDL=pdl), types,
            aligned=("x_ptr", "w_ptr", "s_ptr", "y_ptr", "up_ptr", "norm_ptr", "res_ptr", "stride_wn")))
    return out


@needs_triton
def test_triton_kernels_compile_for_an_h100():
    """The GPU path of every kernel (no interpreter workaround) compiles for sm_90: bf16 attention on
    tensor cores, fp32 in full precision (no mma: tf32 would round it), keys, values and int8 weights
    read 16 bytes a load (the GEMV also on bf16 weights, and with the norm, SwiGLU and residual folded in).
    As dependent launches every kernel waits for the kernel before it and then lets the next one start;
    the attention and its combine load nothing before the wait (all their inputs may come from the
    kernel before), the GEMV only its first weight tile; launched plainly, no grid dependency control."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode == 3:     # another Triton's layout: then the GPU run is the only check
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    for name, f in got.items():
        assert f["store"], name
        if name.startswith("attention"):
            assert f["mma"] == ("bf16" in name) and f["v4"], (name, f)
    assert all(f["v4"] for name, f in got.items() if name.startswith("gemv")), got
    for name, f in got.items():
        if name.endswith("plain-launch"):
            assert not f["wait"] and not f["launch"], (name, f)
            continue
        assert f["wait"] and f["launch"], (name, f)
        # the GEMV's first weight tile and nothing else (4 KB over 128 threads: two 16-byte loads each; an
        # input read early would add its own); the attention and combine nothing
        assert f["loads_before_wait"] == (2 if name.startswith("gemv") else 0), (name, f)


if __name__ == "__main__":
    import json
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        print(f"this Triton has no ahead-of-time compile API ({e})")
        sys.exit(3)
    print(json.dumps(ptx_features()))
