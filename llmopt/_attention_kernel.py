"""The Triton source of `llmopt.kernels.decode_attention`, imported only when it first runs (Triton
is optional; see `_gemv_kernel.py` for why the import waits)."""
import triton
import triton.language as tl


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, last_ptr, out_ptr, lse_ptr, kn_ptr, vn_ptr, cos_ptr,
                            sin_ptr, S, n_kv_heads, scale, split_len, n_splits, sq_b, sq_h, sk_b, sk_h, sk_s, sv_b,
                            sv_h, sv_s, sm_b, sl_b, skn_b, svn_b, sc_b,
                            G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                            BLOCK_D: tl.constexpr, ONE_SPLIT: tl.constexpr, HAS_MASK: tl.constexpr,
                            HAS_LAST: tl.constexpr, APPEND: tl.constexpr, IEEE: tl.constexpr,
                            UPCAST: tl.constexpr, PDL: tl.constexpr):
    """One query row's attention for the G query heads that share one kv head, over one split of
    the keys (program (b * n_kv_heads + kv head, split)); the lengths are runtime arguments, so a
    growing cache does not compile it again. With one split it writes the output;
    with several, each writes its unnormalized share and its log-sum-exp for `combine_kernel`.
    Every tensor is contiguous along its last dim (the wrapper sees to it): wide loads along D.

    APPEND (a decode step over a static cache, `decode_attention_append`): q and the token's key and
    value (kn, vn) arrive as projected; q and the key are rotated here (cos, sin: the token's rotary
    row), the cache's keys before the token's slot (last_ptr) are read, the new key and value join
    from registers in the split that holds the slot, and that split writes them into the cache.

    PDL (a programmatic dependent launch, sm_90 and later): the program is resident before the kernel
    ahead of it ends; it waits for that kernel (every input may come from it) before its first load, then
    lets the next kernel start (the GEMV after it reads its first weights meanwhile)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0) // n_kv_heads
    kvh = tl.program_id(0) % n_kv_heads
    split = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)           # the group's query heads, padded to a tile tl.dot takes
    d = tl.arange(0, BLOCK_D)
    heads = kvh * G + g
    gd_mask = (g[:, None] < G) & (d[None, :] < D)
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gd_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)     # running max of each head's scores
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)             # running sum of exp(score - max)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)    # running sum of exp(score - max) * v
    start = split * split_len
    end = tl.minimum(start + split_len, S)
    if APPEND:
        # rotary: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for x's halves x1, x2; in
        # fp32, rounded once to the cache's dtype (as Inductor's fused rotary rounds)
        partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
        sign = tl.where(d < D // 2, -1.0, 1.0)
        d_mask = d < D
        cos = tl.load(cos_ptr + b * sc_b + d, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * sc_b + d, mask=d_mask, other=0.0).to(tl.float32) * sign
        q_half = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + partner[None, :], mask=gd_mask, other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_half.to(tl.float32) * sin[None, :]).to(q_ptr.dtype.element_ty)
        kn = tl.load(kn_ptr + b * skn_b + kvh * D + d, mask=d_mask, other=0.0)
        kn_half = tl.load(kn_ptr + b * skn_b + kvh * D + partner, mask=d_mask, other=0.0)
        k_new = (kn.to(tl.float32) * cos + kn_half.to(tl.float32) * sin).to(k_ptr.dtype.element_ty)
        v_new = tl.load(vn_ptr + b * svn_b + kvh * D + d, mask=d_mask, other=0.0).to(v_ptr.dtype.element_ty)
        pos = tl.load(last_ptr + b * sl_b).to(tl.int32)     # the token's slot
        end = tl.minimum(end, pos)      # the cache's keys come before it (its own slot is not written yet)
    elif HAS_LAST:      # keys after this row's last visible slot are hidden: the loop stops there
        end = tl.minimum(end, tl.load(last_ptr + b * sl_b).to(tl.int32) + 1)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        in_split = s < end
        if HAS_MASK:    # additive: 0 where this row may attend, -inf elsewhere (the same for its heads)
            add = tl.load(mask_ptr + b * sm_b + s, mask=in_split, other=float("-inf")).to(tl.float32)
        else:
            add = tl.where(in_split, 0.0, float("-inf"))
        # a block of keys this row may not see (all padding, or hidden by its mask) is never read
        if tl.max(add, axis=0) > float("-inf"):
            sd_mask = in_split[:, None] & (d[None, :] < D)
            k = tl.load(k_ptr + b * sk_b + kvh * sk_h + s[:, None] * sk_s + d[None, :],
                        mask=sd_mask, other=0.0)
            if IEEE:    # fp32 inputs: full-precision products (tl.dot would round them to tf32)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            elif UPCAST:    # Triton's CPU interpreter: its tl.dot of bf16 tiles is wrong (Triton 3.9)
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = scores * scale + add[None, :]                  # [BLOCK_G, BLOCK_S], fp32
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))          # finite: one key here is visible
            alpha = tl.exp(m_i - m_new)                              # rescales what came before
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + b * sv_b + kvh * sv_h + s[:, None] * sv_s + d[None, :],
                        mask=sd_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            elif UPCAST:    # the same rounding of p to v's dtype as on the GPU
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    if APPEND:
        if (pos >= start) & (pos < start + split_len):     # this split holds the token's slot
            # the new key's scores and value, one more step of the running softmax
            if HAS_MASK:
                add = tl.load(mask_ptr + b * sm_b + pos).to(tl.float32)
            else:
                add = 0.0
            scores = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale + add
            m_new = tl.maximum(m_i, scores)
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            l_i = l_i * alpha + p
            if not IEEE:    # p rounded to v's dtype, as tl.dot takes it above
                p = p.to(v_ptr.dtype.element_ty).to(tl.float32)
            acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
            # the cache keeps them for the next steps; no other program reads this slot in this launch
            tl.store(k_ptr + b * sk_b + kvh * sk_h + pos * sk_s + d, k_new, mask=d_mask)
            tl.store(v_ptr + b * sv_b + kvh * sv_h + pos * sv_s + d, v_new, mask=d_mask)

    row = b * n_kv_heads * G + heads          # (b, head) in the [B, H] output order
    if ONE_SPLIT:
        out = acc / l_i[:, None]
        tl.store(out_ptr + row[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        seen = l_i > 0                        # a split with no visible key adds nothing
        out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(out_ptr + (row[:, None] * n_splits + split) * D + d[None, :], out, mask=gd_mask)
        tl.store(lse_ptr + row * n_splits + split, lse, mask=g < G)


@triton.jit
def combine_kernel(part_ptr, lse_ptr, out_ptr, n_splits, D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                   BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """out[row] = the splits' outputs weighted by exp(lse_split - lse_all) (program: one (b, head) row);
    PDL as in `decode_attention_kernel`."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + row * n_splits + sp, mask=sp < n_splits, other=float("-inf"))
    top = tl.max(lse, axis=0)                 # finite: every row sees at least one key
    w = tl.exp(lse - top)
    part = tl.load(part_ptr + (row * n_splits + sp[:, None]) * D + d[None, :],
                   mask=(sp[:, None] < n_splits) & (d[None, :] < D), other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
