"""KV caches behind one small interface (notebooks 00 and 02).

Attention at step t needs the keys and values of every earlier token. Without a
cache they are recomputed from scratch each step (cost grows with t); a cache
keeps them, so one decode step only computes the new token's.

Interface, used by `model.Attention`:
    cache.update(layer, input_pos [T], k [B, Hkv, T, D], v) -> (k_all, v_all) [B, Hkv, S, D]
    cache.kv_len(input_pos) -> S, the number of key slots attention sees
    cache.nbytes -> bytes the cache holds
"""
from __future__ import annotations

import torch

from .config import ModelConfig

CACHE_KINDS = ("none", "dynamic", "static")


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of cache one token costs: 2 (k and v) x layers x kv heads x head dim x dtype bytes."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


def kv_cache_bytes(cfg: ModelConfig, batch_size: int, seq_len: int,
                   dtype: torch.dtype = torch.float32) -> int:
    """Predicted cache size for `batch_size` sequences of `seq_len` tokens (notebook 02)."""
    return batch_size * seq_len * kv_bytes_per_token(cfg, dtype)


class StaticKVCache:
    """Preallocated [B, Hkv, max_len, D] buffers per layer, written in place.

    Fixed shapes make the decode step compilable (notebook 08); the price is memory
    reserved up front for the longest sequence.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, input_pos, k)  # k: [B, Hkv, T, D] into slots input_pos
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]

    def kv_len(self, input_pos: torch.Tensor) -> int:
        return self.max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class DynamicKVCache:
    """Grows by concatenation each step: no memory reserved ahead, but a copy per step."""

    def __init__(self, cfg: ModelConfig, batch_size: int = 1, max_len: int | None = None, *,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        self.k: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.v: list[torch.Tensor | None] = [None] * cfg.n_layers

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            if int(input_pos[0]) != self.k[layer].shape[2]:
                raise ValueError("a dynamic cache only appends: input_pos must start at "
                                 f"{self.k[layer].shape[2]}, got {int(input_pos[0])}")
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def kv_len(self, input_pos: torch.Tensor) -> int:
        return int(input_pos[-1]) + 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


def make_cache(kind: str, cfg: ModelConfig, batch_size: int, max_len: int, *,
               device=None, dtype: torch.dtype = torch.float32):
    """A fresh cache of `kind` ("dynamic" or "static"); "none" returns None (recompute)."""
    if kind == "none":
        return None
    if kind == "static":
        return StaticKVCache(cfg, batch_size, max_len, device=device, dtype=dtype)
    if kind == "dynamic":
        return DynamicKVCache(cfg, batch_size, max_len, device=device, dtype=dtype)
    raise ValueError(f"cache must be one of {CACHE_KINDS}, got {kind!r}")
