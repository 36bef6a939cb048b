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

from .config import ModelConfig, check_count

CACHE_KINDS = ("none", "dynamic", "static", "paged")


def to_device(values, device, dtype: torch.dtype = torch.long, out: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor of host values (a list) on `device`, without making the host wait for the device.

    `torch.tensor(values, device="cuda")` copies from ordinary (pageable) host memory, and
    PyTorch follows that copy with a stream synchronize: the host waits until every kernel
    queued so far has finished, so it cannot queue the next step while the device computes
    this one. Staging the values in pinned (page-locked) memory allows a truly asynchronous
    copy, ordered on the stream like any kernel (PyTorch keeps the pinned block alive until
    the copy is done). On a CPU it is plain `torch.tensor`. With `out` (a tensor of as many
    elements, on `device`) the values are copied into it, the same way, and it is returned.
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    if out is not None:
        return out.copy_(torch.tensor(values, dtype=out.dtype, pin_memory=cuda).view(out.shape),
                         non_blocking=cuda)
    if not cuda:
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes of cache one token costs: 2 (k and v) x layers x kv heads x head dim x dtype bytes.

    `dtype`: any torch dtype (torch.int8 or torch.float8_e4m3fn for a quantized cache's
    estimate) or "fp32" / "fp16" / "bf16"."""
    if not isinstance(dtype, torch.dtype):
        from .precision import as_dtype
        dtype = as_dtype(dtype)
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def kv_cache_bytes(cfg: ModelConfig, batch_size: int, seq_len: int,
                   dtype: torch.dtype | str = torch.float32) -> int:
    """Predicted cache size for `batch_size` sequences of `seq_len` tokens (notebook 02)."""
    check_count(batch_size, "batch_size")
    check_count(seq_len, "seq_len")
    return batch_size * seq_len * kv_bytes_per_token(cfg, dtype)


def free_device_bytes(device) -> int | None:
    """Bytes free on a CUDA device (what the caching allocator holds unused counts as taken), None
    elsewhere: a CPU's memory is the operating system's to manage."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)[0]


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
        # Tell torch.compile these buffers never move: without it, CUDA graphs
        # (mode="reduce-overhead") see an input mutated in place each layer and are
        # skipped ("skipping cudagraphs due to mutated inputs"), measured on an H100.
        # guard=False: a new cache of the same shape reuses the compiled code. Only on CUDA,
        # the one place CUDA graphs run: CPU code never imports the compiler for this.
        if self.k and self.k[0].is_cuda:
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t, guard=False)

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


class BlockManager:
    """Bookkeeping for a pool of fixed-size KV blocks: a free list and reference counts.

    Plain Python, no tensors: it only decides which physical block holds which
    logical block of a sequence. A block with several users (a shared prompt)
    is freed when the last one lets go.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        check_count(num_blocks, "num_blocks")
        check_count(block_size, "block_size")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"KV cache out of blocks: need {n}, {len(self.free)} free of "
                              f"{self.num_blocks}; finish or preempt a sequence, or add blocks")
        blocks = [self.free.pop() for _ in range(n)]
        for b in blocks:
            self.refcount[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refcount[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refcount[b] <= 0:
                raise ValueError(f"block {b} released more often than allocated")
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self.free.append(b)


class PagedKVCache:
    """Keys/values in fixed-size blocks from a shared pool, found through a block table.

    Memory is claimed one block (say 16 tokens) at a time as sequences grow, so
    nothing is reserved for tokens that are never generated and finished
    sequences hand their blocks back at once (the continuous-batching engine
    relies on this). Attention gathers a row's blocks back into order; fused
    paged-attention kernels (vLLM) skip that copy.

    pool per layer: [num_blocks * block_size, 2, Hkv, D] (keys and values side by side);
    block_table: [B, max_blocks]

    With `scratch_block`, the pool holds one block more than the manager hands out
    (`self.scratch_block`): the engine's CUDA graphs pad a step to a fixed shape, and the
    padding writes there (cuda_graphs.py).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, block_size: int = 16,
                 num_blocks: int | None = None, device=None, dtype: torch.dtype = torch.float32,
                 manager: BlockManager | None = None, keep_gathered: bool = False,
                 scratch_block: bool = False) -> None:
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)              # blocks per sequence at most
        if manager is None:
            manager = BlockManager(num_blocks or batch_size * self.max_blocks, block_size)
        self.manager = manager
        self.scratch_block = manager.num_blocks if scratch_block else None   # nobody's block
        self.pool_blocks = manager.num_blocks + int(scratch_block)
        slots = self.pool_blocks * block_size
        # keys and values of a slot side by side, so one gather reads both: [slots, 2, Hkv, D]
        self.kv = [torch.zeros(slots, 2, cfg.n_kv_heads, cfg.head_dim, device=device, dtype=dtype)
                   for _ in range(cfg.n_layers)]
        self.k = [t[:, 0] for t in self.kv]      # views: [slots, Hkv, D]
        self.v = [t[:, 1] for t in self.kv]
        self.block_table = torch.zeros(batch_size, self.max_blocks, dtype=torch.long, device=device)
        self.blocks: list[list[int]] = [[] for _ in range(batch_size)]   # host copy per row
        self.device = device
        self.row_lengths: torch.Tensor | None = None   # ragged mode (see set_rows)
        # keep_gathered: the running rows' blocks, gathered into order once, are kept between
        # decode steps ([B, W, 2, Hkv, D] per layer) and extended by each step's token
        self.keep_gathered = keep_gathered
        self.gathered: list[torch.Tensor | None] = [None] * cfg.n_layers
        self._gathered_rows: tuple[list[list[int]], list[int]] | None = None   # blocks, lengths
        self._mode = "gather"       # this step: "gather", or with keep_gathered "regather" / "extend"
        self.gathers = 0            # decode steps that gathered the kept copy afresh (keep_gathered)
        self.mixed = False          # this step mixes decode rows and prompts (set_mixed, attend)
        self._groups: list[tuple] = []

    def set_rows(self, blocks: list[list[int]], lengths: list[int], new_tokens: int = 1) -> int:
        """Ragged mode, for the continuous-batching engine: row b owns `blocks[b]` and
        already caches `lengths[b]` tokens, so the next update writes its `new_tokens`
        at positions lengths[b], lengths[b]+1, ... The engine allocates the blocks
        itself through `manager`. Rows of different lengths decode together (one
        token each); a prefill of several tokens is one row at a time.

        Attention then reads whole blocks (one gather of block ids, not of single
        slots): returns the number of key slots it will see, a multiple of the block
        size; the caller's key mask hides each row's slots past its length.

        With `keep_gathered`, the gathered rows are kept for the next decode step: when
        that step's rows are the same, each one token longer (same blocks, maybe one
        more), it skips the gather and writes its token into the kept copy as well as
        into the blocks. Anything else (a row joins, leaves or has a block copied on
        write, or the rows outgrow the copy's width) gathers again.
        """
        if new_tokens > 1 and len(blocks) > 1:
            raise ValueError("ragged paged cache: several new tokens at once only for one row")
        self.mixed = False
        bs = self.block_size
        write = []                                    # the slot of every new token, on the host
        for row, n in zip(blocks, lengths):
            write += self._slots_of(row, n, new_tokens)
        nb = self.manager.blocks_needed(max(lengths) + new_tokens)
        self._ragged_kv_len = nb * bs
        self.blocks = [list(row) for row in blocks]
        if self.keep_gathered and new_tokens == 1:
            self._mode = "extend" if self._can_extend(blocks, lengths, nb) else "regather"
        else:
            self._mode = "gather"                     # a prefill leaves the kept copy alone
        if self._mode != "extend":                    # the blocks to read, each row padded with block 0
            wb = nb if self._mode == "gather" else self._kept_width(nb)
            table = [row[:wb] + [0] * (wb - len(row[:wb])) for row in blocks]
            self._read_blocks = to_device(table, self.device).flatten()
            self.gathers += self._mode == "regather"
        extra = []
        if self._mode != "gather":                    # where each row's token goes in the kept copy
            width = (len(self._read_blocks) // len(blocks) * bs if self._mode == "regather"
                     else self.gathered[0].shape[1])
            extra = [r * width + n for r, n in enumerate(lengths)]
            self._gathered_rows = ([list(row) for row in blocks], list(lengths))
        idx = to_device(write + extra + list(lengths), self.device)
        self._write, self._gathered_write, self.row_lengths = idx.split([len(write), len(extra), len(lengths)])
        return self._ragged_kv_len

    def use_table(self, write: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor) -> int:
        """Ragged mode with every index already on the device, for the engine's CUDA graphs
        (cuda_graphs.py): T new tokens per row (a step of [B, T] tokens), whose slots are
        `write` [B * T], row by row; attention reads the blocks `table` [B, W] of each row in
        order, and `lengths` [B] are the tokens each row cached before the step (the caller
        masks each query's keys). The graph reads these tensors where they are, so the
        engine refills them for each replay. The kept gathered copy is dropped (this step
        does not extend it). Returns the key slots attention sees, W x block_size."""
        self.drop_gathered()
        self.mixed, self._mode = False, "gather"
        self._write, self._read_blocks, self.row_lengths = write, table.flatten(), lengths
        self._ragged_kv_len = table.shape[1] * self.block_size
        return self._ragged_kv_len

    def _kept_width(self, nb: int) -> int:
        """Blocks per row of a kept gathered copy for rows needing `nb`: rounded up to a
        multiple of 8, so the copy is extended for a while before it must be gathered again."""
        return min(-(-nb // 8) * 8, max(self.max_blocks, nb))

    def _slots_of(self, row: list[int], n: int, new_tokens: int) -> list[int]:
        """Slots of positions n .. n + new_tokens - 1 of a row that owns blocks `row`."""
        bs = self.block_size
        if self.manager.blocks_needed(n + new_tokens) > len(row):
            raise ValueError(f"a row caching {n} tokens needs {self.manager.blocks_needed(n + new_tokens)} "
                             f"blocks for its next {new_tokens} but owns {len(row)}")
        return [row[p // bs] * bs + p % bs for p in range(n, n + new_tokens)]

    def set_mixed(self, blocks: list[list[int]], lengths: list[int],
                  prompts: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """A mixed step (the engine's): one new token for each decode row (`blocks`, `lengths`
        as in `set_rows`) and whole prompts beside them, each (blocks, tokens it already
        caches, new tokens). The step's tokens go through the model as one sequence [1, N],
        the decode rows' first, then each prompt's, so every matmul runs once for all of
        them; `attend` then runs attention group by group: the decode rows together, as in
        a decode step, and each prompt causally over its own blocks. Returns each token's
        position [N].

        Consecutive prompts of equal length (speculation's rows verifying k drafts each, or a
        one-token chunk beside the decode rows) share a group, each row masked to its own blocks.
        This is what vLLM and Sarathi-Serve do so that a new request costs no forward of
        its own; their kernels take every group in one launch (variable-length attention).
        """
        bs, dev = self.block_size, self.device
        rows = [list(row) for row in blocks] + [list(row) for row, _, _ in prompts]
        write, positions, groups = [], [], []      # groups: (first row, rows, first token, tokens, blocks)
        for row, n in zip(blocks, lengths):
            write += self._slots_of(row, n, 1)
        positions += lengths
        if blocks:
            groups.append((0, len(blocks), 0, len(blocks), self.manager.blocks_needed(max(lengths) + 1)))
        for r, (row, start, count) in enumerate(prompts, start=len(blocks)):
            write += self._slots_of(row, start, count)
            nbg = self.manager.blocks_needed(start + count)
            last = groups[-1] if groups else None
            if last is not None and last[3] == last[1] * count:   # as many tokens as the previous group's rows:
                groups[-1] = (last[0], last[1] + 1, last[2], last[3] + count, max(last[4], nbg))   # one more row
            else:
                groups.append((r, 1, len(positions), count, nbg))
            positions += range(start, start + count)
        # one gather of every row (decode rows, then each prompt) per layer, kept for the next
        # decode step as a regather would keep it: those rows are the next step's rows
        nb = max(g[4] for g in groups)
        wb = self._kept_width(nb) if self.keep_gathered else nb
        table = [b for row in rows for b in row[:wb] + [0] * (wb - len(row[:wb]))]
        idx = to_device(write + positions + table, dev)
        self._write, pos, self._read_blocks = idx.split([len(write), len(positions), len(table)])
        self._groups = []
        for first_row, n_rows, first, count, nbg in groups:
            # a query at position p sees its own row's keys at slots <= p: [rows, 1, T, S]
            mask = torch.arange(nbg * bs, device=dev) <= pos[first:first + count].view(n_rows, 1, -1, 1)
            self._groups.append((first_row, n_rows, first, count, nbg * bs, mask))
        self.mixed, self.row_lengths, self._mixed_rows = True, None, len(rows)
        self._mode = "regather" if self.keep_gathered else "gather"
        if self.keep_gathered:   # what each row caches, less the token the next step adds
            self._gathered_rows = (rows, list(lengths) + [start + count - 1 for _, start, count in prompts])
            self.gathers += 1
        return pos

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention) -> torch.Tensor:
        """A mixed step's attention (see `set_mixed`): q [1, H, N, D], k, v [1, Hkv, N, D] for
        the step's N tokens; stores every new key/value, gathers every row's blocks into
        order once, then calls `attention(q, k, v, mask)` once per group. Returns [1, H, N, D]."""
        _, H, N, D = k.shape
        new = torch.stack((k[0], v[0]), 1).transpose(0, 2)            # [N, 2, Hkv, D]
        self.kv[layer].index_copy_(0, self._write, new)
        blocks = self.kv[layer].view(self.pool_blocks, self.block_size, 2, H, D)
        rows = blocks.index_select(0, self._read_blocks).view(self._mixed_rows, -1, 2, H, D)   # [R, W, 2, Hkv, D]
        if self._mode == "regather":
            self.gathered[layer] = rows
        out = []
        for first_row, n_rows, first, count, S, mask in self._groups:
            kv = rows[first_row:first_row + n_rows, :S]
            qg = q[0, :, first:first + count].unflatten(1, (n_rows, -1)).transpose(0, 1)   # [rows, H, T, D]
            o = attention(qg, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), mask)
            out.append(o.transpose(0, 1).flatten(1, 2))                 # [H, count, D]
        return torch.cat(out, 1)[None]

    def _can_extend(self, blocks: list[list[int]], lengths: list[int], nb: int) -> bool:
        """Whether the kept copy holds these rows as the last decode step left them."""
        prev, kept = self._gathered_rows, self.gathered[0]
        return (prev is not None and kept is not None
                and nb * self.block_size <= kept.shape[1] and len(blocks) == len(prev[0])
                and all(n == m + 1 and row[:len(old)] == old
                        for row, n, old, m in zip(blocks, lengths, prev[0], prev[1])))

    def drop_gathered(self) -> None:
        """Free the kept copy (the engine calls this when nothing is running)."""
        self.gathered = [None] * len(self.gathered)
        self._gathered_rows = None

    def reserve(self, num_tokens: int) -> None:
        """Make sure every row has blocks for `num_tokens` positions (allocating as needed)."""
        need = self.manager.blocks_needed(num_tokens)
        if need > self.max_blocks:
            raise ValueError(f"{num_tokens} tokens exceed this cache's {self.max_blocks} blocks per row")
        for row, blocks in enumerate(self.blocks):
            if len(blocks) < need:
                new = self.manager.allocate(need - len(blocks))
                self.block_table[row, len(blocks):need] = to_device(new, self.block_table.device)
                blocks.extend(new)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Physical slot of each logical position: [B, T] from positions [T]."""
        block = self.block_table[:, positions // self.block_size]          # [B, T]
        return block * self.block_size + positions % self.block_size

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B, H, T, D = k.shape
        if self.row_lengths is not None:      # ragged: each row writes after its own length
            new = torch.stack((k.transpose(1, 2), v.transpose(1, 2)), 2).reshape(B * T, 2, H, D)
            self.kv[layer].index_copy_(0, self._write, new)
            # whole blocks, in each row's order: [B, S, 2, Hkv, D]; slots past a row's
            # length hold other data, which the engine's key mask hides
            blocks = self.kv[layer].view(self.pool_blocks, self.block_size, 2, H, D)
            if self._mode == "extend":                    # the kept copy, plus this step's token
                kv = self.gathered[layer]
                kv.view(-1, 2, H, D).index_copy_(0, self._gathered_write, new)
            else:
                kv = blocks.index_select(0, self._read_blocks).view(B, -1, 2, H, D)
            if self._mode == "regather":
                self.gathered[layer] = kv
            kv = kv[:, :self._ragged_kv_len]
            return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if layer == 0:
            self.reserve(int(input_pos[-1]) + 1)
        slots = self.slots(input_pos).flatten()                           # [B*T]
        self.k[layer].index_copy_(0, slots, k.transpose(1, 2).reshape(B * T, H, D))
        self.v[layer].index_copy_(0, slots, v.transpose(1, 2).reshape(B * T, H, D))
        S = int(input_pos[-1]) + 1
        read = self.slots(torch.arange(S, device=input_pos.device))        # [B, S]
        # gather the row's blocks back into position order: [B, Hkv, S, D]
        return self.k[layer][read].transpose(1, 2), self.v[layer][read].transpose(1, 2)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks, source -> destination, in every layer (copy on write)."""
        if not pairs:
            return
        dev = self.kv[0].device
        src = to_device([a for a, _ in pairs], dev)
        dst = to_device([b for _, b in pairs], dev)
        for t in self.kv:
            blocks = t.view(self.pool_blocks, self.block_size, *t.shape[1:])
            blocks.index_copy_(0, dst, blocks.index_select(0, src))

    def kv_len(self, input_pos: torch.Tensor) -> int:
        if self.row_lengths is not None:
            return self._ragged_kv_len
        return int(input_pos[-1]) + 1

    def free(self) -> None:
        """Hand every row's blocks back to the pool."""
        for blocks in self.blocks:
            self.manager.release(blocks)
            blocks.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks actually handed out (what paging saves is nbytes - this)."""
        used = self.manager.num_blocks - self.manager.num_free
        return self.nbytes * used // self.pool_blocks


def make_cache(kind: str, cfg: ModelConfig, batch_size: int, max_len: int, *,
               device=None, dtype: torch.dtype = torch.float32):
    """A fresh cache of `kind` ("dynamic", "static" or "paged"); "none" returns None (recompute)."""
    if kind == "none":
        return None
    if kind == "paged":
        return PagedKVCache(cfg, batch_size, max_len, device=device, dtype=dtype)
    if kind == "static":
        return StaticKVCache(cfg, batch_size, max_len, device=device, dtype=dtype)
    if kind == "dynamic":
        return DynamicKVCache(cfg, batch_size, max_len, device=device, dtype=dtype)
    raise ValueError(f"cache must be one of {CACHE_KINDS}, got {kind!r}")
