"""The Triton source of `llmopt.kernels.gemv` (int8 or full-precision weights), imported only when
it first runs (Triton is optional). Triton decides when this module is imported whether it compiles
the kernel for a GPU or runs it in its CPU interpreter (TRITON_INTERPRET=1)."""
import triton
import triton.language as tl


@triton.jit
def _load(ptr, offs, n, EVEN: tl.constexpr):
    """ptr[offs] in fp32; past n reads 0 (no mask when the blocks fit exactly)."""
    if EVEN:
        v = tl.load(ptr + offs)
    else:
        v = tl.load(ptr + offs, mask=offs < n, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _weight_tile(w_ptr, rn, kk, N, K, stride_wn, EVEN: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile of the weight at rows rn, columns kk (past N or K: 0)."""
    if EVEN:     # N and K are multiples of the blocks: no masks on the hot loop
        return tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :])
    return tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                   other=0)


@triton.jit
def _accumulate(acc, squares, w, x_ptr, up_ptr, norm_ptr, kk, K, EVEN: tl.constexpr, SWIGLU: tl.constexpr,
                NORM: tl.constexpr, dtype: tl.constexpr):
    """acc + w * a[kk] for the input a at columns kk (x, silu(x) * up or x * norm), and NORM's squares."""
    a = _load(x_ptr, kk, K, EVEN)
    if SWIGLU:   # rounded where the unfused layer rounds: silu(gate), then its product with up
        a = (a * tl.sigmoid(a)).to(dtype).to(tl.float32)
        a = (a * _load(up_ptr, kk, K, EVEN)).to(dtype).to(tl.float32)
    if NORM:     # x * norm now; the 1 / rms that scales every a[k] alike comes once, at the end
        squares += a * a
        a = a * _load(norm_ptr, kk, K, EVEN)
    return acc + w.to(tl.float32) * a[None, :], squares


@triton.jit
def gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, up_ptr, norm_ptr, res_ptr, N, K, stride_wn, eps,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, SCALE: tl.constexpr,
                SWIGLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """y[n] = sum_k w[n, k] * a[k] (times s[n]: SCALE, an int8 weight's) for this program's BLOCK_N
    outputs n, where the input a is x; silu(x) * up (SWIGLU: x is the gate); or RMSNorm(x) * norm
    (NORM). RESIDUAL adds res[n].

    PDL (launched as a programmatic dependent launch, sm_90 and later): the program starts while the
    kernel before it still runs; it reads its first weight tile (weights: no kernel writes them), then
    waits for that kernel to finish (its x, up and residual; the memory y reuses) and lets the next
    kernel start the same way."""
    dtype = y_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)   # NORM: x^2, summed along K as x streams by
    w = _weight_tile(w_ptr, rn, rk, N, K, stride_wn, EVEN)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc, squares = _accumulate(acc, squares, w, x_ptr, up_ptr, norm_ptr, rk, K, EVEN, SWIGLU, NORM, dtype)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        w = _weight_tile(w_ptr, rn, kk, N, K, stride_wn, EVEN)
        acc, squares = _accumulate(acc, squares, w, x_ptr, up_ptr, norm_ptr, kk, K, EVEN, SWIGLU, NORM, dtype)
    y = tl.sum(acc, axis=1)
    if SCALE:
        y = y * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if NORM:
        y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    if RESIDUAL:     # the product rounded to the activations' dtype, as the unfused add sees it
        y = y.to(dtype).to(tl.float32) + tl.load(res_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(dtype), mask=rn < N)
