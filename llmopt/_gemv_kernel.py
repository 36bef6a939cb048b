"""The Triton source of `llmopt.kernels.int8_gemv`, imported only when it first runs (Triton is
optional). Triton decides when this module is imported whether it compiles the kernel for a GPU or
runs it in its CPU interpreter (TRITON_INTERPRET=1)."""
import triton
import triton.language as tl


@triton.jit
def int8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """y[n] = sum_k w[n, k] * x[k] * s[n] for this program's BLOCK_N outputs n."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN:     # N and K are multiples of the blocks: no masks on the hot loop
            x = tl.load(x_ptr + kk)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :])
        else:
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :],
                        mask=(rn[:, None] < N) & (kk[None, :] < K), other=0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * scale
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)
