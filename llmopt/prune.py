"""Pruning: unstructured magnitude, structured (heads and MLP channels), 2:4 (notebook 07).

Unstructured pruning zeroes individual weights; the matrices keep their shape,
so dense kernels do exactly the same work (no speed-up without sparse kernels).
Structured pruning removes whole attention heads and MLP channels: the matrices
get smaller and every step gets cheaper. 2:4 semi-structured sparsity (two zeros
in every four weights) is the pattern GPU sparse tensor cores accelerate.

Embeddings, the output head and norms are never pruned.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import Transformer, check_llmopt_model, check_unfused, check_unquantized, is_conv1d, is_linear, linear_from


def prunable(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Module]]:
    """The linear layers pruning applies to (everything but the output head): nn.Linear, and
    transformers' Conv1D (GPT-2's family, weight stored as [in, out])."""
    check_unquantized(model, "pruning")
    layers = [(n, m) for n, m in model.named_modules()
              if is_linear(m) and not any(n == s or n.endswith("." + s) for s in skip)]
    if not layers:
        raise ValueError(f"this {type(model).__name__} has no linear layers to prune (nn.Linear, or "
                         "transformers' Conv1D) outside the output head")
    return layers


def sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over the prunable Linear layers."""
    zeros = total = 0
    for _, m in prunable(model):
        zeros += (m.weight == 0).sum().item()
        total += m.weight.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def magnitude_prune(model: nn.Module, amount: float, *, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Zero the `amount` share of smallest-magnitude weights, per layer or globally; returns masks."""
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    layers = prunable(model)
    masks = {}
    if scope == "global":
        all_w = torch.cat([m.weight.abs().flatten().float() for _, m in layers])
        k = int(amount * all_w.numel())
        threshold = all_w.kthvalue(k).values if k > 0 else torch.tensor(-1.0)
    for name, m in layers:
        w = m.weight.abs().float()
        if scope == "layer":
            k = int(amount * w.numel())
            threshold = w.flatten().kthvalue(k).values if k > 0 else torch.tensor(-1.0)
        masks[name] = (w > threshold).to(m.weight.dtype)
        m.weight.mul_(masks[name])
    return masks


@torch.no_grad()
def semi_structured_2_4(model: nn.Module, *, accelerate: bool = True) -> dict[str, torch.Tensor]:
    """Keep the 2 largest of every 4 consecutive weights in each row (50% sparsity).

    With `accelerate` on a GPU that supports it (fp16/bf16, compute capability 8.0+),
    weights are converted to PyTorch's semi-structured sparse tensors so matmuls use
    sparse tensor cores; elsewhere (and in transformers' Conv1D layers) the zeros are
    stored densely (no speed-up).
    """
    masks = {}
    for name, m in prunable(model):
        w = m.weight.t() if is_conv1d(m) else m.weight       # [out, in]: groups run along the input
        if w.shape[1] % 4:
            raise ValueError(f"{name}: in_features {w.shape[1]} is not a multiple of 4")
        groups = w.abs().reshape(-1, 4)
        keep = groups.topk(2, dim=1).indices
        mask = torch.zeros_like(groups).scatter_(1, keep, 1.0).reshape(w.shape)
        w.mul_(mask)
        masks[name] = mask.t() if is_conv1d(m) else mask     # in the layer's own weight layout
        if accelerate and isinstance(m, nn.Linear) and _semi_structured_ok(w):
            from torch.sparse import to_sparse_semi_structured
            m.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
    return masks


def _semi_structured_ok(w: torch.Tensor) -> bool:
    return (w.is_cuda and w.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(w.device) >= (8, 0))


def _importance(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """L2 norm of each slice along `dim`, summed over the weight matrices that touch it."""
    return sum(p.float().pow(2).sum(dim=dim) for p in parts).sqrt()


@torch.no_grad()
def prune_heads(model: Transformer, keep_kv_heads: int) -> Transformer:
    """Remove whole key/value head groups (each with its query heads) in every layer (in place).

    Grouped-query attention ties `n_heads / n_kv_heads` query heads to each kv head,
    so the unit that can be removed is a group. Every layer keeps its
    `keep_kv_heads` most important groups (largest weight norms), so shapes stay
    uniform and the KV cache shrinks with them.
    """
    check_llmopt_model(model, "prune_heads (structured pruning)")
    check_unfused(model, "prune_heads")
    cfg = model.config
    if not 1 <= keep_kv_heads <= cfg.n_kv_heads:
        raise ValueError(f"keep_kv_heads must be in [1, {cfg.n_kv_heads}], got {keep_kv_heads}")
    rep, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    for layer in model.layers:
        a = layer.self_attn
        q = a.q_proj.weight.reshape(cfg.n_kv_heads, rep * hd, -1)
        o = a.o_proj.weight.reshape(-1, cfg.n_kv_heads, rep * hd)
        k = a.k_proj.weight.reshape(cfg.n_kv_heads, hd, -1)
        v = a.v_proj.weight.reshape(cfg.n_kv_heads, hd, -1)
        score = (q.float().pow(2).sum((1, 2)) + o.float().pow(2).sum((0, 2))
                 + k.float().pow(2).sum((1, 2)) + v.float().pow(2).sum((1, 2)))
        keep = score.topk(keep_kv_heads).indices.sort().values            # kv groups to keep
        q_rows = (keep[:, None] * rep * hd + torch.arange(rep * hd, device=keep.device)).flatten()
        kv_rows = (keep[:, None] * hd + torch.arange(hd, device=keep.device)).flatten()
        a.q_proj = _select(a.q_proj, rows=q_rows)
        a.k_proj = _select(a.k_proj, rows=kv_rows)
        a.v_proj = _select(a.v_proj, rows=kv_rows)
        a.o_proj = _select(a.o_proj, cols=q_rows)
        a.n_heads, a.n_kv_heads = keep_kv_heads * rep, keep_kv_heads
    model.config = cfg.replace(n_heads=keep_kv_heads * rep, n_kv_heads=keep_kv_heads, head_dim=hd)
    return model


@torch.no_grad()
def prune_mlp(model: Transformer, keep_channels: int) -> Transformer:
    """Keep the `keep_channels` most important SwiGLU channels in every layer (in place)."""
    check_llmopt_model(model, "prune_mlp (structured pruning)")
    check_unfused(model, "prune_mlp")
    cfg = model.config
    if not 1 <= keep_channels <= cfg.intermediate_size:
        raise ValueError(f"keep_channels must be in [1, {cfg.intermediate_size}], got {keep_channels}")
    for layer in model.layers:
        mlp = layer.mlp
        score = _importance([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1) * \
            _importance([mlp.down_proj.weight], dim=0)
        keep = score.topk(keep_channels).indices.sort().values
        mlp.gate_proj = _select(mlp.gate_proj, rows=keep)
        mlp.up_proj = _select(mlp.up_proj, rows=keep)
        mlp.down_proj = _select(mlp.down_proj, cols=keep)
    model.config = cfg.replace(intermediate_size=keep_channels)
    return model


def _select(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A smaller Linear holding the chosen output rows and/or input columns."""
    w = lin.weight
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    bias = lin.bias if lin.bias is None or rows is None else lin.bias[rows]
    return linear_from(w, bias)


def recover(model, tokenizer, masks: dict[str, torch.Tensor] | None = None, *, steps: int = 50,
            batch_size: int = 8, seq_len: int = 128, lr: float = 3e-4, seed: int = 0) -> list[float]:
    """A short recovery fine-tune; pruned weights stay zero (masks re-applied after each step)."""
    from .train import finetune
    layers = dict(prunable(model))

    @torch.no_grad()
    def keep_zeros():
        for name, mask in (masks or {}).items():
            layers[name].weight.mul_(mask)

    return finetune(model, tokenizer, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                    seed=seed, after_step=keep_zeros)["losses"]
