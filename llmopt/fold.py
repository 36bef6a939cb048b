"""Folding a decoder layer's small kernels into its matrix-vector products (notebooks 06 and 08).

At batch 1 a decode step is a chain of GEMVs (one activation row times each weight matrix)
with small kernels between them: in every layer an RMSNorm (with the residual add before it)
ahead of q, k, v, another ahead of gate, up, and the SwiGLU `silu(gate) * up` ahead of down.
Compiled, Inductor fuses each of those into one kernel, but it cannot fuse them into a matmul
it does not generate (cuBLAS's, or llmopt's own Triton GEMV), so they stay kernels of their
own: on the H100 of 2026-11-28, 1-1.5 us each, 16 layers, in a 1.04 ms int8 step whose GEMVs
took about half of it at their measured bandwidths.

`fold_layers(model)` makes every layer's one-token step run llmopt's Triton GEMV
(`kernels.gemv`) with that work inside it:
- q, k, v and gate, up read the raw residual stream and multiply it by the norm's weight as it
  streams by, summing its squares in the same loop; the 1 / rms, one number for the whole
  row, scales each output at the end (it comes out of the sum);
- down loads gate and up and computes silu(gate) * up as it reads them;
- o and down add the residual to their outputs, so the stream is written by the GEMVs.
A layer runs four GEMVs (with fused projections, `fuse_projections`) and its attention.
The model's final RMSNorm folds into the output head the same way where the head runs the Triton
GEMV anyway: an int8 head (`quantize(..., kernel="triton-folded")`); a full-precision head
stays on cuBLAS, whose one large matmul read at about 2.8 TB/s on that H100, and keeps the norm
as a kernel of its own.
int8 layers (`quantize(model, "int8", kernel="triton-folded")` folds as it quantizes) and
full-precision ones both fold; prompts, batches and the engine's mixed steps run the usual
`Block.forward`. Triton on a CUDA GPU (or its CPU interpreter, for the tests).
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import check_triton_device, gemv
from .model import Block, RMSNorm, Transformer


class FoldedBlock(Block):
    """A decoder layer whose one-token steps fold its two RMSNorms, its SwiGLU and both residual adds
    into its GEMVs (`fold_layers`). It holds nothing a Block does not: only the step differs."""

    def forward(self, x, cos, sin, mask, cache, input_pos):
        if x.shape[0] * x.shape[1] != 1 or getattr(cache, "mixed", False):
            return super().forward(x, cos, sin, mask, cache, input_pos)
        attn, mlp = self.self_attn, self.mlp
        # x: [1, 1, D], the residual stream, read raw: each GEMV normalizes its own input
        norm = self.input_layernorm
        if attn.qkv_proj is not None:
            q, k, v = linear_gemv(attn.qkv_proj, x, norm=norm).split(attn.qkv_sizes, dim=-1)
        else:
            q, k, v = (linear_gemv(p, x, norm=norm) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        h = linear_gemv(attn.o_proj, attn.attend(q, k, v, cos, sin, mask, cache, input_pos), residual=x)  # x + o(.)
        norm = self.post_attention_layernorm
        if mlp.gate_up_proj is not None:
            gate, up = linear_gemv(mlp.gate_up_proj, h, norm=norm).chunk(2, dim=-1)
        else:
            gate, up = linear_gemv(mlp.gate_proj, h, norm=norm), linear_gemv(mlp.up_proj, h, norm=norm)
        return linear_gemv(mlp.down_proj, gate, up=up, residual=h)      # h + down(silu(gate) * up)


class FoldedTransformer(Transformer):
    """A model whose final RMSNorm, on one-token steps, is folded into its output head's GEMV
    (`fold_layers`), when the head runs llmopt's Triton GEMV anyway (an int8 head quantized with
    `kernel="triton"` or `"triton-folded"`): one kernel a step fewer. Only the step differs."""

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[1] != 1 or getattr(self.lm_head, "kernel", None) != "triton":
            return super().head(x)
        return linear_gemv(self.lm_head, x, norm=self.norm)


def linear_gemv(linear: nn.Module, x: torch.Tensor, *, up: torch.Tensor | None = None,
                norm: RMSNorm | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` (an nn.Linear or an Int8Linear) on one row x [1, 1, K] through `kernels.gemv`: on
    silu(x) * up (`up`) or on `norm(x)` (an RMSNorm), `residual` [1, 1, N] added to its output."""
    scale = linear.scale if linear.weight.dtype == torch.int8 else None
    # the kernel adds the residual, unless a bias must come first (Qwen2's q, k, v have one; o and down not)
    fold_residual = residual is not None and linear.bias is None
    y = gemv(x.reshape(-1), linear.weight, scale, None if up is None else up.reshape(-1),
             None if norm is None else norm.weight, 0.0 if norm is None else norm.eps,
             residual.reshape(-1) if fold_residual else None)
    y = y.reshape(*x.shape[:-1], -1)
    if linear.bias is not None:
        y = y + linear.bias
    return y + residual if residual is not None and not fold_residual else y


def foldable(layer: nn.Module) -> bool:
    """Whether every projection of `layer` (a Block) is one `linear_gemv` runs: an nn.Linear or an
    Int8Linear (not int4, not a tensor-parallel shard's all-reducing one)."""
    from .quantize import Int8Linear
    parts = [layer.self_attn, layer.mlp]
    linears = [m for part in parts for m in part.children()]
    return all(type(m) is nn.Linear or isinstance(m, Int8Linear) for m in linears)


def fold_layers(model: Transformer) -> Transformer:
    """Make each layer a `FoldedBlock` (in place; its class swapped, as torch's parametrize does):
    one-token steps with the norms, SwiGLU and residual adds inside the GEMVs (notebook 08), and
    the model a `FoldedTransformer` (the final norm inside an int8 head's GEMV). Layers with a
    projection `linear_gemv` cannot run (int4) stay as they are; `unfold_layers` undoes it."""
    if not isinstance(model, Transformer):
        raise ValueError(f"fold_layers folds llmopt's own layers (a Transformer); this is a {type(model).__name__}")
    check_triton_device(next(model.parameters()).device, "fold_layers", "leave the layers unfolded")
    folded = 0
    for layer in model.layers:
        if foldable(layer):
            layer.__class__ = FoldedBlock
            folded += 1
    if not folded:
        raise ValueError("fold_layers found no layer to fold: it runs nn.Linear and int8 projections "
                         "(quantize(model, 'int8')), not int4 or tensor-parallel ones; leave this model unfolded")
    if type(model) is Transformer:
        model.__class__ = FoldedTransformer
    return model


def unfold_layers(model: Transformer) -> Transformer:
    """Undo `fold_layers` (in place): every layer a plain Block again, the final norm its own kernel."""
    if type(model) is FoldedTransformer:
        model.__class__ = Transformer
    for layer in model.layers:
        if type(layer) is FoldedBlock:
            layer.__class__ = Block
    return model
