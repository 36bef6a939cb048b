"""Hand-written Triton kernels for the decode step (notebooks 06, 08 and 03): a matrix-vector
product for int8 (or full-precision) weights that can fold in the small jobs around it, and
attention for one query row over a KV cache.

## gemv

At batch 1 a decode step multiplies one activation row by every weight matrix: a GEMV,
which reads each weight once and does two flops per byte of int8 weight. Its speed is the
speed at which the weights stream from memory. On an H100 (2026-11-27) the kernels that
Inductor generated for compiled int8 (multiply and sum, `quantize.Int8Linear`) ran at
about half the copy bandwidth (the fused gate / up one: 27.4 us for 33.5 MB, 1.2 TB/s),
so int8 bought 1.16x over bf16 where halving the bytes promises up to 2x. This kernel, first
run on an H100 on 2026-11-28 (the 1B shape, 16 decode steps per CUDA graph), decoded int8 at
963 tokens/s against 697 with Inductor's kernels and 701 for bf16: 1.37x over bf16.

`gemv(x, weight, scale)` computes y = (weight @ x) * scale for one row x [K], an int8
weight [N, K] and one scale per output [N] (`int8_gemv` is the same op); with `scale=None`
the weight is in x's dtype. Each program owns BLOCK_N outputs and walks along K in BLOCK_K
steps, loading a [BLOCK_N, BLOCK_K] tile (contiguous along K, so every load is wide and
coalesced), converting it to fp32 in registers and accumulating weight x activation; the sum
along K and the scale come once at the end. The tile is read exactly once and no
full-precision copy of an int8 weight is ever written. The block sizes come from the shape
(`gemv_config`), so there is no autotuning to run, and the kernel launches the same way
inside a CUDA graph (`generate(..., graph_steps=k)`). `quantize(model, "int8",
kernel="triton")` puts it behind every Int8Linear.

It also does the small jobs around it as it streams its input: take silu(x) * up (a SwiGLU
MLP's down projection, `up`), or x's RMSNorm times the norm's weight (`norm`: x^2 summed in
the same loop, the 1 / rms applied to each output at the end), and add a residual to its
output (`residual`). `llmopt.fold.fold_layers(model)` uses them so that a layer's one-token
step is four GEMVs and attention, without the add + RMSNorm and SwiGLU kernels between them.

## decode_attention

A decode step's attention is one query row per sequence against every key in the cache:
little work and little data (the 1B model at 288 keys reads 0.6 MB a layer), so its cost is
latency. On the H100 profile of 2026-11-28 cuDNN's attention took 6.9 us a layer, 8% of a
decode step, for a kernel built for long query blocks. `decode_attention` is flash decoding:
the keys are cut into splits so that the programs fill the GPU (one program per sequence,
kv head and split), each program computes the scores of all the query heads that share its
kv head (grouped-query attention reads each key once) with a running softmax, and a second
small kernel weighs the splits together by their log-sum-exp. A plain decode step passes the
token's own cache slot (`last`) rather than a mask: the programs stop there, so the unwritten
end of a static cache is never read, and no [1, S] mask is made (compiled, it was made again
for every layer); with a mask (a padded batch), a block of keys it hides entirely is skipped.
`model.set_attention("triton")` sends every one-token attention through it (prompts keep SDPA).

`decode_attention_append` is the same kernel with the work before it: over a static cache, a
step's q, k and v arrive as projected; each program rotates its query heads and its kv head's
new key (rotary, in fp32), reads the cache's keys before the token's slot, and the program whose
split holds that slot adds the new key and value from registers and writes them into the cache.
No program reads that slot from memory in the same launch, so there is no race. Compiled, the
rotary and cache writes were three or four small kernels a layer on the H100 of 2026-11-28.

## Dependent launch

Once folded, a layer's one-token step is six of these kernels in a row (four GEMVs, the attention
and its combine), each a few microseconds, each reading little. Between two kernels of a stream the
GPU idles: the next kernel's programs are scheduled only when the last program of the one before
has ended, and each then waits for its first loads from memory. On Hopper (compute capability 9.0)
a kernel can be launched as a *programmatic dependent launch* (PDL): its programs start while the
kernel before it still runs, do what needs nothing from it, and wait (`gdc_wait`, Triton's grid
dependency control) until that kernel has finished and its writes are visible. Here each kernel,
once past its wait, lets the next one start (`gdc_launch_dependents`), and the GEMV reads its first
weight tile before waiting: a model's weights are written when it loads, never by the kernel just
before (a caller that writes a weight and calls `gemv` on it next must turn dependent launch off).
The attention and its combine load nothing before their wait: every input of theirs may come
from the kernel before. As each lets the next start only once past its own wait, at most two run
at once and the earlier has nothing left to wait for. Recorded in a CUDA graph, the launches keep
this. `dependent_launch(device)` says whether it applies (CUDA, Hopper or later, a Triton with grid
dependency control); `set_dependent_launch(False)` (or LLMOPT_DEPENDENT_LAUNCH=0, or
`with dependent_launches(False):` for a while) launches plainly, so the GPU suite times both. Not yet
measured on a GPU.

`gemv`, `decode_attention` and `decode_attention_append` are `torch.library` custom ops, so
torch.compile treats each as one opaque kernel. They
run on CUDA GPUs; with `TRITON_INTERPRET=1` Triton's interpreter runs them on a CPU (slowly,
with numpy), which is how the tests check them on machines without a GPU, and
`tests/test_kernels.py` compiles them for an H100 (sm_90) with Triton's own compiler, which
needs no GPU, to catch what the interpreter does not.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os

import torch


def triton_available() -> bool:
    """Whether Triton is installed (it comes with PyTorch's CUDA builds on Linux)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(device: torch.device, what: str = "kernel='triton'",
                        fix: str = "use kernel='auto'") -> None:
    """A clear error where llmopt's Triton kernels cannot run (`what` names the option, `fix` the way out)."""
    if not triton_available():
        raise ValueError(f"{what} needs Triton: it comes with PyTorch's CUDA builds on Linux "
                         f"(or pip install triton); {fix} otherwise")
    if torch.device(device).type != "cuda" and not interpreting():
        raise ValueError(f"{what} runs on CUDA GPUs, not on {torch.device(device).type!r} "
                         f"(TRITON_INTERPRET=1 runs it on a CPU, slowly, for testing); {fix}")


# programmatic dependent launch (sm_90 and later) for the kernels below; LLMOPT_DEPENDENT_LAUNCH=0 turns it off
_dependent_launch = os.environ.get("LLMOPT_DEPENDENT_LAUNCH", "1") not in ("", "0")


def set_dependent_launch(on: bool) -> bool:
    """Launch llmopt's kernels as programmatic dependent launches where the GPU has them (`on`), or
    plainly; returns the previous setting. A CUDA graph keeps the launches it recorded: set this
    before recording (`generate`'s `DecodeGraph` records again when it changes)."""
    global _dependent_launch
    previous, _dependent_launch = _dependent_launch, bool(on)
    return previous


@contextlib.contextmanager
def dependent_launches(on: bool):
    """`set_dependent_launch(on)` for a `with` block, then the setting it had."""
    previous = set_dependent_launch(on)
    try:
        yield
    finally:
        set_dependent_launch(previous)


def dependent_launch(device: torch.device) -> bool:
    """Whether llmopt's kernels launch on `device` as programmatic dependent launches: the setting is
    on (`set_dependent_launch`), the device is a CUDA GPU of compute capability 9.0 or later (Hopper),
    and this Triton has grid dependency control (3.4 and later); never in Triton's interpreter."""
    if not _dependent_launch:       # checked per launch: the cheap tests first
        return False
    device = device if isinstance(device, torch.device) else torch.device(device)
    return (device.type == "cuda" and not interpreting()
            and _gpu_has_dependent_launch(device.index if device.index is not None else torch.cuda.current_device()))


@functools.lru_cache(maxsize=None)
def _gpu_has_dependent_launch(index: int) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9 or not triton_available():
        return False
    import triton.language.extra.cuda as cuda_extra
    from triton.backends.nvidia.compiler import CUDAOptions
    return hasattr(cuda_extra, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__


def _launch_options(pdl: bool) -> dict:
    """The keyword arguments that launch a Triton kernel with PDL = `pdl` (constexpr and launch flag)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def gemv_config(n: int, k: int, element_size: int = 1) -> dict:
    """Block sizes and warps for an [n, k] weight of `element_size` bytes a weight. Up to 8 outputs a
    program, fewer where that leaves under 264 programs (two per SM of an H100's 132); 512 bytes of K
    per row of the tile (wide 16-byte loads), more for long rows when the tile has few of them, so each
    program keeps about 4 KB of loads in flight. Timed for int8 on an H100 (2026-11-28,
    `benchmarks/gpu_kernels.py --gemv`, Llama-3.2-1B's shapes): 8 outputs a program read the large
    weights at 2.7-2.8 TB/s where 16 reached 2.5-2.6 (the fused gate / up and the 128,256-row lm_head);
    the smaller weights' picks were the best of their neighbours or within 5% of it. The same bytes
    for a bf16 weight (half the K per tile) are not timed yet."""
    block_n = 8
    while block_n > 1 and -(-n // block_n) < 264:
        block_n //= 2
    block_k = 512 // element_size
    while block_n * block_k * element_size < 4096 and block_k * element_size < 2048 and block_k * 2 <= k:
        block_k *= 2
    block_k = min(block_k, max(16, 1 << (k - 1).bit_length()))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k,
            "num_warps": 4 if block_n * block_k * element_size >= 4096 else 2}


def gemv_with(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, config: dict, *,
              up: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """`gemv` with the given block sizes and warps (tests and block-size sweeps)."""
    n, k = weight.shape
    int8 = weight.dtype == torch.int8
    if x.shape != (k,) or (int8 and (scale is None or scale.shape != (n,))) or \
            (not int8 and (scale is not None or weight.dtype != x.dtype)):
        raise ValueError(f"gemv takes x [K] and an int8 weight [N, K] with scale [N], or a weight in x's dtype "
                         f"with scale None; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, scale {None if scale is None else tuple(scale.shape)}")
    for name, t, size in (("up", up, k), ("norm", norm, k), ("residual", residual, n)):
        if t is not None and t.shape != (size,):
            raise ValueError(f"gemv's {name} is [{'N' if name == 'residual' else 'K'}] = [{size}] "
                             f"for a weight {tuple(weight.shape)}; got {tuple(t.shape)}")
    if up is not None and norm is not None:
        raise ValueError("gemv's input is silu(x) * up or RMSNorm(x) * norm, not both: pass up or norm")
    x, weight = x.contiguous(), weight.contiguous()
    up, norm, residual = (t if t is None else t.contiguous() for t in (up, norm, residual))
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    even = n % config["BLOCK_N"] == 0 and k % config["BLOCK_K"] == 0
    grid = (-(-n // config["BLOCK_N"]),)
    from ._gemv_kernel import gemv_kernel    # Triton, on first use (the source is in that file)
    # a pointer whose flag is off (SCALE, SWIGLU, NORM, RESIDUAL) is never read: any tensor stands in
    gemv_kernel[grid](x, weight, x if scale is None else scale, y, x if up is None else up,
                      x if norm is None else norm, y if residual is None else residual, n, k, weight.stride(0),
                      eps, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], EVEN=even, SCALE=int8,
                      SWIGLU=up is not None, NORM=norm is not None, RESIDUAL=residual is not None,
                      num_warps=config["num_warps"], **_launch_options(dependent_launch(x.device)))
    return y


@torch.library.custom_op("llmopt::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, up: torch.Tensor | None = None,
         norm: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y [N] = (weight [N, K] @ a [K]) * scale [N] (+ residual [N]), in x's dtype (fp32 accumulation);
    the weight int8 with its scale, or in x's dtype with scale None. The input a is x [K]; with `up`
    [K], silu(x) * up (a SwiGLU MLP's down projection, x its gate); with `norm` [K], x's RMSNorm (eps
    `eps`) times `norm`. Those, and the residual add, are what `fold.fold_layers` folds into a layer's
    GEMVs. As a dependent launch (Hopper) it reads the weight's first tile before the kernel before it has
    finished: that kernel must not be the one that wrote the weight (see the module's "Dependent launch")."""
    return gemv_with(x, weight, scale, gemv_config(*weight.shape, weight.element_size()), up=up, norm=norm,
                     eps=eps, residual=residual)


@gemv.register_fake
def _(x, weight, scale, up=None, norm=None, eps=0.0, residual=None):
    return x.new_empty(weight.shape[0])


int8_gemv = gemv    # its first name, from when it took int8 weights only


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter on a CPU: 8, to exercise splits)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def decode_attention_config(batch: int, n_kv_heads: int, group: int, n_keys: int, head_dim: int,
                            processors: int = 132) -> dict:
    """Tiles and splits for one query row per sequence over `n_keys` keys: 64 keys a block; as many
    splits as fill `processors` once with one program per (sequence, kv head, split), never fewer than
    a block of keys each. The query heads of a group, and the head dim, are padded to 16 or more
    (the smallest tile tl.dot takes)."""
    block_s = 64
    blocks = -(-n_keys // block_s)
    want = max(1, -(-processors // (batch * n_kv_heads)))
    split_len = block_s * -(-blocks // min(blocks, want))
    return {"BLOCK_S": block_s, "SPLIT_LEN": split_len, "SPLITS": -(-n_keys // split_len),
            "BLOCK_G": max(16, 1 << (group - 1).bit_length()),
            "BLOCK_D": max(16, 1 << (head_dim - 1).bit_length()), "num_warps": 4}


def decode_attention_with(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          config: dict, last: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_attention` with the given tiles and splits (tests and sweeps)."""
    check_triton_device(q.device, "llmopt's Triton decode attention", "use model.set_attention('sdpa')")
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if (T != 1 or k.shape != (B, Hkv, S, D) or v.shape != k.shape or H % Hkv):
        raise ValueError(f"decode_attention takes q [B, H, 1, D], k and v [B, Hkv, S, D] (H a multiple of Hkv) "
                         f"and a mask [B or 1, 1, 1, S], [1, S] or None; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, mask {None if mask is None else tuple(mask.shape)}")
    if last is not None and (last.dim() != 1 or last.shape[0] not in (1, B) or last.is_floating_point()):
        raise ValueError(f"decode_attention's last slot is an integer tensor [B] or [1]; got {last.dtype} "
                         f"{tuple(last.shape)}")
    # the kernel takes the last dim contiguous (wide loads); the cache's buffers and q's view are
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _launch_attention(q, k, v, _additive_mask(mask, q, B, S, "decode_attention"), config, last)


def decode_attention_append_with(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                 sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 pos: torch.Tensor, mask: torch.Tensor | None, config: dict) -> torch.Tensor:
    """`decode_attention_append` with the given tiles and splits (tests and sweeps)."""
    check_triton_device(q.device, "llmopt's Triton decode attention", "use model.set_attention('sdpa')")
    B, Hkv, S, D = k_cache.shape
    H = q.shape[-1] // D if q.dim() == 3 else 0
    if (q.shape != (B, 1, H * D) or H % Hkv or k.shape != (B, 1, Hkv * D) or v.shape != k.shape
            or v_cache.shape != k_cache.shape or D % 2 or cos.shape[-1] != D or cos.numel() not in (D, B * D)
            or sin.shape != cos.shape):
        raise ValueError(f"decode_attention_append takes q [B, 1, H*D], k and v [B, 1, Hkv*D] as projected, cos "
                         f"and sin [B or 1, ..., D] and caches [B, Hkv, S, D] (H a multiple of Hkv, D even); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos {tuple(cos.shape)}, "
                         f"caches {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"decode_attention_append writes into caches in q's dtype ({q.dtype}), contiguous along "
                         f"the head dim; got {k_cache.dtype} and {v_cache.dtype} with strides {k_cache.stride()}")
    if pos.shape != (1,) or pos.is_floating_point():
        raise ValueError(f"decode_attention_append's pos is the token's slot, an integer tensor [1]; got {pos.dtype} "
                         f"{tuple(pos.shape)}")
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
    cos, sin = cos.reshape(-1, D), sin.reshape(-1, D)
    q4 = q.view(B, 1, H, D).transpose(1, 2)     # [B, H, 1, D] with q's own strides
    return _launch_attention(q4, k_cache, v_cache, _additive_mask(mask, q, B, S, "decode_attention_append"),
                             config, pos, new=(k.view(B, -1), v.view(B, -1), cos, sin)).view(B, 1, H * D)


def _additive_mask(mask: torch.Tensor | None, q: torch.Tensor, B: int, S: int, what: str) -> torch.Tensor | None:
    """A [B, 1, 1, S] additive (0 / -inf) mask contiguous along S, from a boolean or additive one of
    [B or 1, 1, 1, S] or [1, S]."""
    if mask is None:
        return None
    if mask.dim() == 2:    # [1, S]: the same keys for every row and head
        mask = mask[None, None]
    if mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != S or mask.shape[0] not in (1, B):
        raise ValueError(f"{what} takes a mask [B or 1, 1, 1, S], [1, S] or None with S = {S} keys; "
                         f"got mask {tuple(mask.shape)}")
    if mask.dtype == torch.bool:    # True: may attend -> additive 0 / -inf
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    mask = mask.expand(B, 1, 1, S)
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def _launch_attention(q, k, v, mask, config, last, new=None):
    """The kernels of `decode_attention_with` (q [B, H, 1, D]) and, with `new` = (k_new, v_new, cos, sin),
    of `decode_attention_append_with` (`last` is then the token's slot)."""
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    splits = config["SPLITS"]
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    part = out if splits == 1 else torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
    lse = out if splits == 1 else torch.empty(B, H, splits, device=q.device, dtype=torch.float32)
    # a pointer whose flag is off (HAS_MASK, HAS_LAST, APPEND) is never read: any tensor stands in
    m = mask if mask is not None else q
    lst = last if last is not None else q
    last_stride = 0 if last is None or last.shape[0] == 1 else last.stride(0)
    kn, vn, cos, sin = new if new is not None else (q, q, q, q)
    pdl = _launch_options(dependent_launch(q.device))
    from ._attention_kernel import combine_kernel, decode_attention_kernel
    decode_attention_kernel[(B * Hkv, splits)](
        q, k, v, m, lst, part, lse, kn, vn, cos, sin, S, Hkv, 1.0 / math.sqrt(D), config["SPLIT_LEN"], splits,
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], m.stride(0), last_stride,
        kn.stride(0), vn.stride(0), 0 if cos.shape[0] == 1 else cos.stride(0),
        G=H // Hkv, D=D, BLOCK_G=config["BLOCK_G"], BLOCK_S=config["BLOCK_S"], BLOCK_D=config["BLOCK_D"],
        ONE_SPLIT=splits == 1, HAS_MASK=mask is not None, HAS_LAST=last is not None and new is None,
        APPEND=new is not None, IEEE=q.dtype == torch.float32, UPCAST=interpreting(),
        num_warps=config["num_warps"], **pdl)
    if splits > 1:
        combine_kernel[(B * H,)](part, lse, out, splits, D=D, BLOCK_SPLITS=max(2, 1 << (splits - 1).bit_length()),
                                 BLOCK_D=config["BLOCK_D"], **pdl)
    return out


@torch.library.custom_op("llmopt::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     last: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for one query row: q [B, H, 1, D]; k, v [B, Hkv, S, D]
    (grouped-query: query head h reads kv head h // (H / Hkv)); mask [B or 1, 1, 1, S] or [1, S], additive
    (0 / -inf) or boolean (True: may attend), None for every key; `last` [B or 1] (integers): each row sees
    no key after this slot (a decode step over a cache: the token's own slot), None for no such limit.
    Returns [B, H, 1, D] in q's dtype."""
    B, H, _, D = q.shape
    cfg = decode_attention_config(B, k.shape[1], H // k.shape[1], k.shape[2], D, _processors(q.device))
    return decode_attention_with(q, k, v, mask, cfg, last)


@decode_attention.register_fake
def _(q, k, v, mask, last=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("llmopt::decode_attention_append", mutates_args=("k_cache", "v_cache"))
def decode_attention_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's attention over a static cache with the work before it in the same kernel:
    q [B, 1, H*D], k and v [B, 1, Hkv*D] as their projections made them; cos, sin [B or 1, 1, 1, D] the
    token's rotary row. q and k are rotated, k and v written into the caches [B, Hkv, S, D] at slot
    `pos` [1] (in place, as `StaticKVCache.update` does), and q attends over the cache's keys up to and
    including that slot (`mask` as in `decode_attention`, for a padded batch). Returns [B, 1, H*D], o_proj's
    input, in q's dtype. One launch where the step had rotary, two cache writes and attention."""
    B, Hkv, S, D = k_cache.shape
    H = q.shape[-1] // D
    cfg = decode_attention_config(B, Hkv, H // Hkv, S, D, _processors(q.device))
    return decode_attention_append_with(q, k, v, cos, sin, k_cache, v_cache, pos, mask, cfg)


@decode_attention_append.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos, mask=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
