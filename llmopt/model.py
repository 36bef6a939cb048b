"""A Llama-family decoder, short enough to read in one sitting (notebook 00).

RMSNorm, rotary position embeddings (with Llama 3 and linear rope scaling),
grouped-query attention with optional q/k/v bias (Qwen2), a SwiGLU MLP and
optionally tied embeddings. Module names follow Hugging Face's, so a
checkpoint's `model.safetensors` loads with a plain `load_state_dict`.

One forward serves three uses:
- `model(ids)`                           full sequence, no cache (training, recompute);
- `model(ids, input_pos, cache)`         prefill: writes the prompt's keys/values;
- `model(ids[:, -1:], input_pos, cache)` decode: one token, reads the cache.
`llmopt.generate` wraps these as `prefill` and `decode_one_token`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .kernels import check_triton_device, decode_attention, decode_attention_append
from .kv_cache import StaticKVCache
from .precision import as_dtype, check_device

# "triton": llmopt's Triton kernel for the one-token steps of decoding (kernels.decode_attention; over a
# static cache kernels.decode_attention_append, which also rotates q, k and writes the cache), SDPA for prompts
ATTENTION_BACKENDS = ("sdpa", "plain", "triton")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps), computed in fp32 (as transformers does) by one fused
        # op, then scaled in the model's dtype.
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies [head_dim/2], with Llama 3 or linear scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band
        # between interpolated smoothly (Llama 3.1 paper, section 3.2 / HF code).
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.qkv_proj: nn.Module | None = None      # q, k and v in one matmul (`fuse_projections`)
        self.backend = "sdpa"

    @property
    def qkv_sizes(self) -> list[int]:
        """Output widths of q, k and v: how a fused `qkv_proj` output splits apart."""
        return [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2

    def forward(self, x, cos, sin, mask, cache, input_pos):
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, cos, sin, mask, cache, input_pos))

    def attend(self, q, k, v, cos, sin, mask, cache, input_pos):
        """What lies between the projections: q [B, T, H*D] and k, v [B, T, Hkv*D] as projected are
        rotated, k and v stored in the cache, and q attends over it; returns [B, T, H*D], o_proj's input."""
        B, T, _ = q.shape
        if (self.backend == "triton" and T == 1 and isinstance(cache, StaticKVCache) and mask is not None
                and cache.k[self.layer_idx].dtype == q.dtype):
            # a decode step over a static cache: rotary, the cache write and attention in one kernel, where
            # compiled they were three or four (H100 profile, 2026-11-28). The [1, S] mask of a plain step
            # (slots <= input_pos) is the kernel's own rule; a padded batch's [B, 1, 1, S] one is passed
            return decode_attention_append(q, k, v, cos, sin, cache.k[self.layer_idx], cache.v[self.layer_idx],
                                           input_pos, None if mask.dim() == 2 else mask)
        # q: [B, H, T, D]; k, v: [B, Hkv, T, D]
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if getattr(cache, "mixed", False):
            # a continuous-batching step of decode rows and new prompts side by side: the
            # cache stores every new key/value and attends group by group (PagedKVCache.attend)
            out = cache.attend(self.layer_idx, q, k, v, self.attention)
        else:
            if cache is not None:
                # k, v: [B, Hkv, S, D] -- every key/value the cache holds for this layer
                k, v = cache.update(self.layer_idx, input_pos, k, v)
            if self.backend == "triton" and T == 1 and mask is not None and mask.dim() == 2:
                # a plain decode step over another cache (layer_inputs' [1, S] mask: slots <= input_pos): the
                # kernel takes the token's slot instead of the mask, which torch.compile would otherwise
                # compute again for every layer, the mask being cheap to recompute (seen in its CPU code)
                out = decode_attention(q, k, v, None, input_pos)
            else:
                out = self.attention(q, k, v, mask)
        return out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)

    def attention(self, q, k, v, mask):
        """Attention over q [B, H, T, D] and k, v [B, Hkv, S, D] with this layer's backend;
        `mask` [T, S] or [B or 1, 1, T, S]: boolean (True: may attend) or additive (0 / -inf), None
        for causal. With "triton", one-token steps (T = 1) go through `kernels.decode_attention`."""
        if self.backend == "triton" and q.shape[-2] == 1 and (mask is None or mask.dim() == 2
                                                               or mask.shape[1] == 1):
            return decode_attention(q, k, v, mask)
        if self.backend != "plain":
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[-2] > 1,
                enable_gqa=self.n_heads != self.n_kv_heads)
        return plain_attention(q, k, v, mask)


def plain_attention(q, k, v, mask):
    """softmax(Q K^T / sqrt(d)) V with the [T, S] score matrix written out (notebook 03)."""
    T, S = q.shape[-2], k.shape[-2]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # grouped-query: each kv head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:   # additive: 0 keeps a score, -inf removes it (Transformer.layer_inputs)
        scores = scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matmul (`fuse_projections`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Llama-family decoder: `forward(input_ids [B, T]) -> logits [B, T, vocab]`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # fp32 rotary frequencies; a plain attribute, so casting the model to
        # fp16/bf16 never rounds them.
        self.inv_freq = rope_inv_freq(cfg)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in (norm weights are never quantized)."""
        return self.norm.weight.dtype

    def set_attention(self, backend: str) -> "Transformer":
        """Choose `"sdpa"` (fused kernels), `"plain"` (explicit softmax) or `"triton"` (SDPA, and
        llmopt's Triton flash-decoding kernel for one-token steps: `kernels.decode_attention`)
        attention (notebook 03)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        if backend == "triton":
            check_triton_device(self.device, "set_attention('triton')", "use 'sdpa'")
        for layer in self.layers:
            layer.self_attn.backend = backend
        return self

    def layer_inputs(self, B: int, T: int, device, input_pos=None, cache=None, positions=None,
                     key_mask=None):
        """What every layer needs besides the hidden states: rotary cos/sin, the attention mask
        and the cache slots (shared by `forward` and the pipeline stages of notebook 10)."""
        if input_pos is None:
            input_pos = torch.arange(T, device=device)
        if positions is None:
            positions = input_pos.unsqueeze(0).expand(B, T)
        # Rotary tables in fp32, as transformers computes them: cos, sin [B, 1, T, D]
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

        mask = None  # None means plain causal over [T, T]
        if getattr(cache, "mixed", False):
            pass     # a mixed step: the cache holds one mask per group of rows (PagedKVCache.set_mixed)
        elif key_mask is not None and key_mask.dim() == 3:
            mask = key_mask[:, None]    # [B, T, S]: each query's own keys, given whole (the engine's graphs)
        elif cache is not None or key_mask is not None:
            S = cache.kv_len(input_pos) if cache is not None else T
            slots = torch.arange(S, device=device)
            # a query at slot p sees keys at slots <= p: [T, S]
            mask = slots.unsqueeze(0) <= input_pos.unsqueeze(1)
            if key_mask is not None:
                # padding keys are hidden; a query that would see nothing at all (a
                # padding token's own query) sees itself, so softmax never gets an empty row
                mask = mask & key_mask[:, None, :S]
                empty = ~mask.any(-1, keepdim=True)
                mask = mask | (empty & (slots.unsqueeze(0) == input_pos.unsqueeze(1)))
                mask = mask[:, None]  # [B, 1, T, S]
        if mask is not None:
            # additive (0 where a query may attend, -inf elsewhere) in the activations' dtype, once for
            # every layer: SDPA turns a boolean mask into this on each call, one more small kernel per
            # layer per decode step on a GPU (H100 kernel profile, 2026-11-28); the same values, so the
            # same outputs (plain attention adds it). Compiled, Inductor may still compute the mask again
            # inside each layer's kernels (cheap pointwise work it prefers to redo; seen in its CPU code),
            # which is why the Triton decode path takes the token's slot instead (Attention.attend)
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=device).masked_fill_(~mask, float("-inf"))
        return cos, sin, mask, input_pos

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache=None, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, last_only: bool = False,
                logits_to_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with `last_only`, [B, K, vocab] with `logits_to_keep`).

        input_pos: [T] cache slots the tokens occupy (default 0..T-1).
        positions: [B, T] rotary positions, when rows differ (left padding); default input_pos.
        key_mask:  [B, S] True for real tokens, False for padding, over the cache's slots; or
                   [B, T, S], the keys each query may see (then nothing else is masked; every
                   query must see at least one key).
        logits_to_keep: [K] the positions along T whose logits are computed (the lm_head is
                   the largest matmul: a mixed step of many prompt tokens needs one per row).
        """
        B, T = input_ids.shape
        cos, sin, mask, input_pos = self.layer_inputs(B, T, input_ids.device, input_pos, cache,
                                                      positions, key_mask)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, input_pos)
        if last_only:
            x = x[:, -1:]
        elif logits_to_keep is not None:
            x = x[:, logits_to_keep]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] of the last layer's output x [B, T, D]: the final RMSNorm, then the
        output head (`fold.FoldedTransformer` folds the norm into the head's GEMV)."""
        return self.lm_head(self.norm(x))


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding copies of `weight` [out, in] and `bias` [out] (pruning, fusing)."""
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                  dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


def is_conv1d(m: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 and its family): a linear layer storing its weight as [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def is_linear(m: nn.Module) -> bool:
    """A layer computing x @ W^T + b: nn.Linear, or transformers' Conv1D."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def as_linear(m: nn.Module) -> nn.Linear:
    """`m` itself if it is an nn.Linear; a Conv1D as an equivalent nn.Linear (a copy, weight transposed)."""
    return linear_from(m.weight.t(), m.bias) if is_conv1d(m) else m


FUSED_GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(model: Transformer) -> Transformer:
    """Concatenate each layer's q, k, v projections into one Linear, and gate with up (in place).

    The layer computes the same thing (outputs split back apart), with three matmuls fewer
    per layer: each launch and each small matmul has a cost of its own, which a decode step
    at batch 1 pays 7 times a layer (notebook 08). Fuse before quantizing (`quantize` then
    treats each fused Linear as one); `unfuse_projections` restores the usual layout, which
    saving, tensor parallelism and structured pruning need.
    """
    check_llmopt_model(model, "fuse_projections")
    for layer in model.layers:
        for part, fused, names in FUSED_GROUPS:
            owner = getattr(layer, part)
            if getattr(owner, fused) is not None:
                continue
            parts = [getattr(owner, n) for n in names]
            if any(type(m) is not nn.Linear for m in parts):
                raise ValueError(f"fuse_projections needs plain nn.Linear layers, found "
                                 f"{type(parts[0]).__name__}: fuse before quantizing or pruning")
            with torch.no_grad():
                linear = linear_from(torch.cat([m.weight for m in parts]),
                                     torch.cat([m.bias for m in parts]) if parts[0].bias is not None else None)
            linear.requires_grad_(parts[0].weight.requires_grad)
            for n in names:
                delattr(owner, n)
            setattr(owner, fused, linear)
    return model


def unfuse_projections(model: Transformer) -> Transformer:
    """Undo `fuse_projections` (in place): separate q, k, v and gate, up Linears again."""
    check_llmopt_model(model, "unfuse_projections")
    for layer in model.layers:
        for part, fused, names in FUSED_GROUPS:
            owner, linear = getattr(layer, part), getattr(getattr(layer, part), fused)
            if linear is None:
                continue
            if type(linear) is not nn.Linear:
                raise ValueError(f"cannot unfuse a {type(linear).__name__}: unfuse before quantizing")
            sizes = owner.qkv_sizes if fused == "qkv_proj" else [linear.out_features // 2] * 2
            weights = linear.weight.detach().split(sizes)
            biases = linear.bias.detach().split(sizes) if linear.bias is not None else [None] * len(sizes)
            for n, w, b in zip(names, weights, biases):
                setattr(owner, n, linear_from(w, b).requires_grad_(linear.weight.requires_grad))
            setattr(owner, fused, None)
    return model


def is_fused(model) -> bool:
    """Whether `fuse_projections` has been applied (only llmopt's own models can be)."""
    return any(getattr(getattr(layer, "self_attn", None), "qkv_proj", None) is not None
               or getattr(getattr(layer, "mlp", None), "gate_up_proj", None) is not None
               for layer in getattr(model, "layers", ()))


def check_unfused(model, what: str) -> None:
    """A clear error for the operations that need the usual q/k/v, gate/up layout."""
    if is_fused(model):
        raise ValueError(f"{what} needs separate q, k, v and gate, up projections: call "
                         "llmopt.unfuse_projections(model) first")


def check_unquantized(model, what: str,
                      fix: str = "apply it to the model before quantizing (or to a freshly loaded copy)") -> None:
    """A clear error for the operations that need the full-precision weights (`llmopt.quantize`d
    models record how, in `model.quantization`; transformers' own quantizers in the config)."""
    done = getattr(model, "quantization", None)
    bnb = getattr(getattr(model, "config", None), "quantization_config", None)
    if done or bnb:
        how = done["method"] if done else type(bnb).__name__ if not isinstance(bnb, dict) else \
            bnb.get("quant_method", "transformers")
        raise ValueError(f"{what} needs full-precision weights, and this model is already quantized "
                         f"({how}): {fix}")


def check_llmopt_model(model, what: str) -> None:
    """A clear error when `what` (one of llmopt's generation paths) gets a model it cannot run."""
    if isinstance(getattr(model, "config", None), ModelConfig):
        return
    from .draft import MLPDraft
    if isinstance(model, MLPDraft):
        raise TypeError(f"{getattr(model, 'name', 'this')!r} is an MLP draft (llmopt.draft): it only proposes "
                        "tokens for speculative decoding; pass it as the draft: speculative_generate(target, "
                        "draft, tokenizer, prompt), with a target such as load_model('tiny')")
    name = type(model).__name__
    if callable(getattr(model, "generate", None)) and hasattr(model, "config"):     # transformers
        if name in SUPPORTED_ARCHITECTURES:
            raise TypeError(f"{what} runs llmopt models, and this is a transformers {name}: convert it "
                            "with model, tokenizer = llmopt.from_transformers(model, tokenizer), or time "
                            "transformers' own generate with llmopt.hf_generate")
        raise TypeError(f"{what} runs llmopt models, and this is a transformers {name}, an architecture "
                        f"llmopt does not implement ({', '.join(SUPPORTED_ARCHITECTURES)}): time it with "
                        "llmopt.hf_generate; the helpers (profiling, metrics, quantize) take it as it is")
    raise TypeError(f"{what} runs llmopt models (llmopt.load_model, llmopt.from_transformers), got a {name}")


def build_model(cfg: ModelConfig, *, device=None, dtype: torch.dtype | None = None,
                seed: int | None = 0) -> Transformer:
    """A model with random weights (std 0.02, as Llama initializes), for shape-only speed runs."""
    device = check_device(device)
    if seed is not None:
        torch.manual_seed(seed)
    with device:
        model = Transformer(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    if dtype is not None:
        model = model.to(as_dtype(dtype))
    return model.eval()
