"""A hand-written Triton kernel: int8 weight-only matrix-vector product for decoding (notebook 06).

At batch 1 a decode step multiplies one activation row by every weight matrix: a GEMV,
which reads each weight once and does two flops per byte of int8 weight. Its speed is the
speed at which the weights stream from memory. On an H100 (2026-11-27) the kernels that
Inductor generated for compiled int8 (multiply and sum, `quantize.Int8Linear`) ran at
about half the copy bandwidth (the fused gate / up one: 27.4 us for 33.5 MB, 1.2 TB/s),
so int8 bought 1.16x over bf16 where halving the bytes promises up to 2x. This kernel, first
run on an H100 on 2026-11-28 (the 1B shape, 16 decode steps per CUDA graph), decoded int8 at
963 tokens/s against 697 with Inductor's kernels and 701 for bf16: 1.37x over bf16.

`int8_gemv(x, weight, scale)` computes y = (weight @ x) * scale for one row x [K], int8
weight [N, K] and one scale per output [N]. Each program owns BLOCK_N outputs and walks
along K in BLOCK_K steps, loading a [BLOCK_N, BLOCK_K] int8 tile (contiguous along K, so
every load is wide and coalesced), converting it to fp32 in registers and accumulating
weight x activation; the sum along K and the scale come once at the end. The int8 tile is
read exactly once and no full-precision copy of the weight is ever written. The block
sizes come from the shape (`gemv_config`), so there is no autotuning to run, and the
kernel launches the same way inside a CUDA graph (`generate(..., graph_steps=k)`).

It is a `torch.library` custom op, so torch.compile treats it as one opaque kernel. It
runs on CUDA GPUs; with `TRITON_INTERPRET=1` Triton's interpreter runs it on a CPU
(slowly, with numpy), which is how the tests check it on machines without a GPU.
`quantize(model, "int8", kernel="triton")` puts it behind every Int8Linear.
"""
from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether Triton is installed (it comes with PyTorch's CUDA builds on Linux)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_gemv_device(device: torch.device) -> None:
    """A clear error where the Triton GEMV cannot run."""
    if not triton_available():
        raise ValueError("kernel='triton' needs Triton: it comes with PyTorch's CUDA builds on Linux "
                         "(or pip install triton); use kernel='auto' otherwise")
    if torch.device(device).type != "cuda" and not interpreting():
        raise ValueError(f"kernel='triton' runs on CUDA GPUs, not on {torch.device(device).type!r} "
                         "(TRITON_INTERPRET=1 runs it on a CPU, slowly, for testing); use kernel='auto'")


def gemv_config(n: int, k: int) -> dict:
    """Block sizes and warps for an [n, k] int8 weight. Up to 8 outputs a program, fewer where
    that leaves under 264 programs (two per SM of an H100's 132); 512 bytes of K per row of the
    tile (wide 16-byte loads), more for long rows when the tile has few of them, so each program
    keeps about 4 KB of loads in flight. Timed on an H100 (2026-11-28, `benchmarks/gpu_kernels.py
    --gemv`, Llama-3.2-1B's shapes): 8 outputs a program read the large weights at 2.7-2.8 TB/s
    where 16 reached 2.5-2.6 (the fused gate / up and the 128,256-row lm_head); the smaller
    weights' picks were the best of their neighbours or within 5% of it."""
    block_n = 8
    while block_n > 1 and -(-n // block_n) < 264:
        block_n //= 2
    block_k = 512
    while block_n * block_k < 4096 and block_k < 2048 and block_k * 2 <= k:
        block_k *= 2
    block_k = min(block_k, max(16, 1 << (k - 1).bit_length()))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4 if block_n * block_k >= 4096 else 2}


def gemv_with(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: dict) -> torch.Tensor:
    """`int8_gemv` with the given block sizes and warps (tests and block-size sweeps)."""
    n, k = weight.shape
    if x.shape != (k,) or scale.shape != (n,) or weight.dtype != torch.int8:
        raise ValueError(f"int8_gemv takes x [K], an int8 weight [N, K] and scale [N]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)} {weight.dtype}, scale {tuple(scale.shape)}")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    even = n % config["BLOCK_N"] == 0 and k % config["BLOCK_K"] == 0
    grid = (-(-n // config["BLOCK_N"]),)
    from ._gemv_kernel import int8_gemv_kernel    # Triton, on first use (the source is in that file)
    int8_gemv_kernel[grid](x, weight, scale, y, n, k, weight.stride(0), BLOCK_N=config["BLOCK_N"],
                           BLOCK_K=config["BLOCK_K"], EVEN=even, num_warps=config["num_warps"])
    return y


@torch.library.custom_op("llmopt::int8_gemv", mutates_args=())
def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y [N] = (weight [N, K] int8 @ x [K]) * scale [N], in x's dtype (fp32 accumulation)."""
    return gemv_with(x, weight, scale, gemv_config(*weight.shape))


@int8_gemv.register_fake
def _(x, weight, scale):
    return x.new_empty(weight.shape[0])
