"""CUDA graphs for batched decode steps whose inputs change every step (notebooks 04 and 13).

`record_cuda_graph` records any step (also `generate`'s `DecodeGraph`, notebook 08).
`BatchStepGraph` is static batching's decode step as one graph: a batch keeps its shape
from its first step to its last, so one graph serves the whole batch, replayed with each
step's token and position copied into its buffers (`generate_batch(..., cuda_graphs=True)`).

`EngineGraphs` is the continuous-batching engine's steps as graphs, which is harder.
On a GPU a small model's decode step is bound by the host: Python launches the
forward's hundred-odd kernels one by one, and that takes longer than running them
(the H100 run of 2026-11-27: `tiny`'s batched step took about 3 ms, most of it
launching). A CUDA graph launches a recorded step at once (notebook 08), but it
replays fixed shapes at fixed addresses, while an engine's batch changes at every
step: rows join and leave, and every row's cache grows.

vLLM's answer, followed here: record one graph per *bucket* of shapes, and pad each
step up to its bucket. A bucket is (rows, new tokens per row, key blocks per row), each
rounded up to a power of two (at most `max_batch_size`, the token budget and the cache's
`max_blocks`). A decode step adds one token a row; a step that also brings new prompts
in (a mixed step) adds a whole prompt in the joining rows, so every row's new tokens
are left padded up to the longest prompt's bucket and the last position holds each
row's last token. Padding (rows, and queries of rows with fewer new tokens) writes its
keys into a scratch block no sequence owns, and its logits are dropped; every query
sees its own row's keys up to its own position. The step's inputs (tokens, each row's
cached and new token counts, the slots of its new tokens and its block table) are
copied into the bucket's own buffers, in one copy, before each replay. A step over the
token budget (rows x new tokens per row, padded, above 1,024) runs eagerly, as without
graphs. A speculative step (rows verifying drafts: 1 to k + 1 new tokens a row) is a mixed
step whose buckets keep the logits of every position, not only the last. The padding is
real work, negligible on a GPU for a small model whose steps wait on the host, and a cost
on a CPU.

The first step of a bucket runs eagerly on a side stream (its logits are real), then
is recorded (`record_cuda_graph`); every graph shares one memory pool, as they never
run at once. A failed recording warns and leaves the engine eager from then on. On a
CPU there is nothing to record: the padded steps run eagerly (same tokens), so the
whole path is tested without a GPU. A graph holds the weights' addresses: build a new
engine after changing the model's weights.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from .kv_cache import PagedKVCache, to_device


class GraphRecordingError(RuntimeError):
    """Recording a CUDA graph failed; the warm-up run before it succeeded (`result`)."""

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


def record_cuda_graph(fn, *, pool=None, stream=None):
    """Run `fn()` once, then record what it launches as a CUDA graph: (first result, graph).

    The first run is the warm-up, on a side stream as PyTorch's CUDA-graph notes ask
    (compiling, autotuning and library handles happen there); its result is real. The
    recording runs nothing: every replay fills the tensors `fn` wrote during it. `pool`
    and `stream` are `torch.cuda.graph`'s (graphs that never run at once may share a
    memory pool). A failed recording raises `GraphRecordingError`, carrying the warm-up's
    result (a failed warm-up raises what it raised)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream().wait_stream(side)
    if isinstance(result, torch.Tensor):   # made on the side stream, read on this one from now on
        result.record_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: work other threads do meanwhile (another request) is not an error
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            fn()                                         # records; runs nothing
    except Exception as e:
        raise GraphRecordingError(f"{type(e).__name__}: {e}", result) from e
    return result, graph


def replay_or_record(holder, run, what: str, *, pool=None, stream=None) -> tuple[torch.Tensor, str | None]:
    """`run()`'s logits through the CUDA graph kept on `holder` (its `graph` and `logits`):
    replayed when recorded, else recorded now (the warm-up's logits are this call's).
    Returns (logits, None), or, when recording fails, (the warm-up's logits, why) after a
    warning that `what` runs eagerly from now on (the caller keeps it eager)."""
    if holder.graph is not None:
        holder.graph.replay()
        return holder.logits, None

    def keep():           # the recording's output is what every replay fills
        holder.logits = run()
        return holder.logits
    try:
        logits, holder.graph = record_cuda_graph(keep, pool=pool, stream=stream)
    except GraphRecordingError as e:
        warnings.warn(f"recording {what} as a CUDA graph failed ({e}); it runs eagerly from now on",
                      RuntimeWarning, stacklevel=3)
        return e.result, str(e)
    return logits, None


class BatchStepGraph:
    """One batched decode step over a static cache as a CUDA graph (static batching, notebook 04).

    `step(model, token [B, 1], input_pos [1], cache, positions=, key_mask=)` is the step to
    record (`decode_one_token`). A static cache attends over all its `max_len` slots with a
    mask, so every step of a batch has the same shapes: `start` sets the batch's left
    padding and key mask, then each `run` copies the new tokens and the cache slot into the
    graph's buffers and replays (each row's rotary position, slot minus its padding, is
    computed inside the graph). On a CPU, or after a failed recording (which warns), the
    same step runs eagerly. The graph holds the addresses of the weights and the cache:
    `llmopt.batching` keeps one per model and cache (`batch_step_graph`).
    """

    def __init__(self, model, cache, batch: int, step, weights: tuple = ()) -> None:
        self._model = weakref.ref(model)
        self.cache, self.batch, self.step, self.weights = cache, batch, step, weights
        device = model.device
        self.record = device.type == "cuda"
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)     # [B, 1]
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)        # the slot, [1]
        self.pad = torch.zeros(batch, 1, dtype=torch.long, device=device)       # left padding [B, 1]
        self.key_mask = torch.zeros(batch, cache.max_len, dtype=torch.bool, device=device)
        self.logits: torch.Tensor | None = None
        self.graph = None
        self.replays = 0
        self.error: str | None = None

    @property
    def model(self):
        return self._model()

    def start(self, pad: torch.Tensor, key_mask: torch.Tensor) -> None:
        """A new batch: its rows' left padding [B, 1] and key mask [B, max_len]."""
        self.pad.copy_(pad)
        self.key_mask.copy_(key_mask)

    def run(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [B, V] for `token` [B] (device) at cache slot `pos`."""
        self.token[:, 0].copy_(token)
        to_device([pos], self.input_pos.device, out=self.input_pos)
        if not self.record or self.error is not None:
            return self._run()
        self.replays += self.graph is not None
        logits, self.error = replay_or_record(self, self._run, "the batched decode step")
        return logits

    def _run(self) -> torch.Tensor:
        return self.step(self.model, self.token, self.input_pos, self.cache,
                         positions=self.input_pos - self.pad, key_mask=self.key_mask)


def bucket(n: int, cap: int) -> int:
    """`n` rounded up to a power of two, at most `cap` (1 <= n <= cap)."""
    return min(1 << (n - 1).bit_length(), cap)


class StepBucket:
    """The buffers (and, on a GPU, the graph) of one step shape: `batch` rows of `queries` new
    tokens each (left padded) that read `width` blocks of keys each; with `every`, the step keeps
    the logits of every query (speculation's verification), else each row's last."""

    def __init__(self, batch: int, queries: int, width: int, block_size: int, device, every: bool = False) -> None:
        self.batch, self.queries, self.width, self.every = batch, queries, width, every
        B, Q, W = batch, queries, width
        # every index a step needs, in one buffer (one host-to-device copy a step): tokens cached
        # per row [B], new tokens per row [B], write slots [B, Q], block table [B, W], tokens [B, Q]
        self.inputs = torch.zeros(B * (2 + 2 * Q + W), dtype=torch.long, device=device)
        self.lengths, self.counts, write, table, tokens = self.inputs.split([B, B, B * Q, B * W, B * Q])
        self.write, self.table, self.tokens = write, table.view(B, W), tokens.view(B, Q)
        self.last_slot = torch.tensor([width * block_size - 1], device=device)    # input_pos [1]
        self.logits: torch.Tensor | None = None    # [B, V] or [B, Q, V], the graph's output (a GPU)
        self.graph = None
        self.steps = 0                             # steps of this shape


class EngineGraphs:
    """The engine's steps as CUDA graphs, one per bucket of shapes (see the module).

    A step's rows are the running rows (one new token each, given on the device) and then
    the prompts joining in this step (their tokens, from the host). Each row's new tokens
    are left padded to the bucket's query count, so its last token's logits are the last
    position's; padding queries write into the scratch block. A bucket's rows x queries may
    be at most `max_tokens` (`fits`): a step with longer prompts runs eagerly.

    `steps` counts the steps that went through the buckets, `replays` those that replayed
    a recorded graph (0 on a CPU), `recorded` the graphs recorded; `error` says why
    recording failed, if it did (the engine then runs eagerly).
    """

    def __init__(self, model, cache: PagedKVCache, max_batch_size: int, max_tokens: int = 1024) -> None:
        if cache.scratch_block is None:
            raise ValueError("EngineGraphs needs a PagedKVCache made with scratch_block=True "
                             "(padding rows write there)")
        self.model, self.cache = model, cache
        self.max_batch_size, self.max_tokens = max_batch_size, max_tokens
        self.device = model.device
        self.record = self.device.type == "cuda"
        self.buckets: dict[tuple[int, int, int], StepBucket] = {}
        self.steps = self.replays = 0
        self.error: str | None = None
        self.pool = self.stream = None
        if self.record:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(self.device)   # every recording on one stream, as pools ask

    @property
    def recorded(self) -> int:
        return sum(b.graph is not None for b in self.buckets.values())

    def table(self) -> list[dict]:
        """One row per bucket met so far: rows, queries per row, key blocks per row, whether it keeps every
        position's logits, steps, recorded."""
        return [dict(rows=b.batch, queries=b.queries, key_blocks=b.width, every_position=b.every, steps=b.steps,
                     recorded=b.graph is not None) for _, b in sorted(self.buckets.items())]

    def bucket_of(self, rows: int, queries: int, lengths: list[int], counts: list[int]) -> tuple[int, int, int]:
        """(rows, queries per row, blocks per row) of the bucket for a step whose rows cache
        `lengths` tokens and add `counts` tokens each (`queries` = the most of them; the step
        must `fit`)."""
        blocks = self.cache.manager.blocks_needed(max(n + q for n, q in zip(lengths, counts)))
        return (bucket(rows, self.max_batch_size), bucket(queries, self.max_tokens),
                bucket(blocks, self.cache.max_blocks))

    def fits(self, rows: int, queries: int) -> bool:
        """Whether a step of `rows` rows adding at most `queries` tokens each goes through a bucket:
        its rows x queries, both rounded up to powers of two, within `max_tokens`."""
        return bucket(rows, self.max_batch_size) * (1 << (queries - 1).bit_length()) <= self.max_tokens

    def forward(self, blocks: list[list[int]], lengths: list[int], tokens: torch.Tensor,
                prompts: list[list[int]] = (), every: bool = False) -> torch.Tensor:
        """Logits [R, V], one per row, as `Engine._forward_rows` / `_forward_mixed` compute them:
        row r owns `blocks[r]` and caches `lengths[r]` tokens; the first len(tokens) rows add
        one token each (`tokens`, a device tensor), the rest add `prompts` (host ids), one
        prompt per row. With `every`, logits [R, Q, V] at every query of the bucket (Q, the
        bucket's queries per row; each row's new tokens are its last positions)."""
        cache, R, D = self.cache, len(blocks), len(tokens)
        counts = [1] * D + [len(p) for p in prompts]
        b = self._bucket(self.bucket_of(R, max(counts), lengths, counts) + (every,))
        B, Q, W = b.batch, b.queries, b.width
        scratch = cache.scratch_block
        free = scratch * cache.block_size              # where padding queries write
        write, table, ids = [], [], []
        for r in range(B):
            if r < R:
                n, q, row = lengths[r], counts[r], blocks[r]
                write += [free] * (Q - q) + cache._slots_of(row, n, q)
                table += row[:W] + [scratch] * (W - len(row[:W]))
                ids += [0] * (Q - q) + (list(prompts[r - D]) if r >= D else [0])
            else:                                      # a padding row
                write += [free] * Q
                table += [scratch] * W
                ids += [0] * Q
        pad = [0] * (B - R)
        to_device(lengths + pad + counts + pad + write + table + ids, self.device, out=b.inputs)
        if D:
            b.tokens[:D, Q - 1].copy_(tokens)          # the running rows' tokens, still on the device
        cache.use_table(b.write, b.table, b.lengths)
        self.steps += 1
        b.steps += 1
        if not self.record or self.error is not None:
            return self._run(b)[:R]
        self.replays += b.graph is not None
        logits, self.error = replay_or_record(b, lambda: self._run(b), "the engine's step",
                                              pool=self.pool, stream=self.stream)
        return logits[:R]

    def _bucket(self, key: tuple[int, int, int, bool]) -> StepBucket:
        if key not in self.buckets:
            rows, queries, width, every = key
            self.buckets[key] = StepBucket(rows, queries, width, self.cache.block_size, self.device, every)
        return self.buckets[key]

    def _run(self, b: StepBucket) -> torch.Tensor:
        """The padded step, eagerly: logits [b.batch, V] (with `b.every`, [b.batch, b.queries, V])."""
        Q, S = b.queries, b.width * self.cache.block_size
        t = torch.arange(Q, device=self.device)
        # each query's position: its row's cached tokens, then its place among the row's new ones
        pos = (b.lengths[:, None] + t - (Q - b.counts[:, None])).clamp(min=0)            # [B, Q]
        # a query sees its row's keys up to its own position (padding queries: finite, dropped)
        mask = torch.arange(S, device=self.device) <= pos[:, :, None]                     # [B, Q, S]
        logits = self.model(b.tokens, b.last_slot, self.cache, positions=pos, key_mask=mask, last_only=not b.every)
        return logits if b.every else logits[:, -1]
