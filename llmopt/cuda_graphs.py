"""CUDA graphs for batched decode steps whose inputs change every step (notebooks 04 and 13).

`record_cuda_graph` records any step (also `generate`'s `DecodeGraph`, notebook 08).
`BatchStepGraph` is static batching's decode step as one graph: a batch keeps its shape
from its first step to its last, so one graph serves the whole batch, replayed with each
step's token and position copied into its buffers (`generate_batch(..., cuda_graphs=True)`).

`EngineGraphs` is the continuous-batching engine's:

On a GPU a small model's decode step is bound by the host: Python launches the
forward's hundred-odd kernels one by one, and that takes longer than running them
(the H100 run of 2026-11-27: `tiny`'s batched step took about 3 ms, most of it
launching). A CUDA graph launches a recorded step at once (notebook 08), but it
replays fixed shapes at fixed addresses, while an engine's batch changes at every
step: rows join and leave, and every row's cache grows.

vLLM's answer, followed here: record one graph per *bucket* of shapes, the batch
rounded up to a power of two (at most `max_batch_size`) and the key blocks per row
rounded up to a power of two (at most the cache's `max_blocks`), and pad each step up
to its bucket. Padding rows write their keys into a scratch block no sequence owns
and their logits are dropped; key slots past a row's length are masked, as always.
The step's inputs (tokens, each row's length, the slot of its new token and its
block table) are copied into the bucket's own buffers, in one copy, before each
replay. Steps that bring new prompts in (a mixed step: its shape depends on the
prompts) run eagerly, as without graphs.

The first step of a bucket runs eagerly on a side stream (its logits are real), then
is recorded (`record_cuda_graph`); every graph shares one memory pool, as they never
run at once. A failed recording warns and leaves the engine eager from then on. On a
CPU there is nothing to record: the padded steps run eagerly (same tokens), so the
whole path is tested without a GPU. A graph holds the weights' addresses: build a new
engine after changing the model's weights.
"""
from __future__ import annotations

import warnings

import torch

from .kv_cache import PagedKVCache, to_device


class GraphRecordingError(RuntimeError):
    """Recording a CUDA graph failed (the warm-up run before it succeeded)."""


def record_cuda_graph(fn, *, pool=None, stream=None):
    """Run `fn()` once, then record what it launches as a CUDA graph: (first result, graph).

    The first run is the warm-up, on a side stream as PyTorch's CUDA-graph notes ask
    (compiling, autotuning and library handles happen there); its result is real. The
    recording runs nothing: every replay fills the tensors `fn` wrote during it. `pool`
    and `stream` are `torch.cuda.graph`'s (graphs that never run at once may share a
    memory pool). A failed recording raises `GraphRecordingError` (a failed warm-up raises
    what it raised)."""
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
        raise GraphRecordingError(f"{type(e).__name__}: {e}") from e
    return result, graph


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
        import weakref
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
        if self.graph is None:
            try:
                logits, self.graph = record_cuda_graph(lambda: self._run(keep=True))
            except GraphRecordingError as e:
                self.error = str(e)
                warnings.warn(f"recording the batched decode step as a CUDA graph failed ({e}); "
                              "it runs eagerly instead", RuntimeWarning, stacklevel=2)
                return self._run()
            return logits
        self.graph.replay()
        self.replays += 1
        return self.logits

    def _run(self, keep: bool = False) -> torch.Tensor:
        logits = self.step(self.model, self.token, self.input_pos, self.cache,
                           positions=self.input_pos - self.pad, key_mask=self.key_mask)
        if keep:              # the recording's output: what every replay fills
            self.logits = logits
        return logits


def bucket(n: int, cap: int) -> int:
    """`n` rounded up to a power of two, at most `cap` (1 <= n <= cap)."""
    return min(1 << (n - 1).bit_length(), cap)


class StepBucket:
    """The buffers (and, on a GPU, the graph) of one decode-step shape: `batch` rows that
    read `width` blocks of keys each."""

    def __init__(self, batch: int, width: int, block_size: int, device) -> None:
        self.batch, self.width = batch, width
        # every index a step needs, in one buffer (one host-to-device copy a step):
        # lengths [B], write slots [B], block table [B, W]
        self.inputs = torch.zeros(batch * (2 + width), dtype=torch.long, device=device)
        self.lengths = self.inputs[:batch]
        self.write = self.inputs[batch:2 * batch]
        self.table = self.inputs[2 * batch:].view(batch, width)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)     # [B, 1]
        self.last_slot = torch.tensor([width * block_size - 1], device=device)    # input_pos [1]
        self.logits: torch.Tensor | None = None    # [B, V], the graph's output (a GPU)
        self.graph = None
        self.steps = 0                             # decode steps of this shape


class EngineGraphs:
    """The engine's decode-only steps as CUDA graphs, one per bucket of shapes (see the module).

    `steps` counts the steps that went through the buckets, `replays` those that replayed
    a recorded graph (0 on a CPU), `recorded` the graphs recorded; `error` says why
    recording failed, if it did (the engine then runs eagerly).
    """

    def __init__(self, model, cache: PagedKVCache, max_batch_size: int) -> None:
        if cache.scratch_block is None:
            raise ValueError("EngineGraphs needs a PagedKVCache made with scratch_block=True "
                             "(padding rows write there)")
        self.model, self.cache, self.max_batch_size = model, cache, max_batch_size
        self.device = model.device
        self.record = self.device.type == "cuda"
        self.buckets: dict[tuple[int, int], StepBucket] = {}
        self.steps = self.replays = 0
        self.error: str | None = None
        if self.record:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(self.device)   # every recording on one stream, as pools ask

    @property
    def recorded(self) -> int:
        return sum(b.graph is not None for b in self.buckets.values())

    def table(self) -> list[dict]:
        """One row per bucket met so far: rows, key blocks per row, decode steps, recorded."""
        return [dict(rows=b.batch, key_blocks=b.width, steps=b.steps, recorded=b.graph is not None)
                for _, b in sorted(self.buckets.items())]

    def bucket_of(self, batch: int, lengths: list[int]) -> tuple[int, int]:
        """(rows, blocks per row) of the bucket for `batch` rows caching `lengths` tokens."""
        blocks = self.cache.manager.blocks_needed(max(lengths) + 1)     # the new token's included
        return bucket(batch, self.max_batch_size), bucket(blocks, self.cache.max_blocks)

    def forward(self, blocks: list[list[int]], lengths: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for one new token per row, as `Engine._forward_rows` computes them:
        row b owns `blocks[b]`, caches `lengths[b]` tokens, and its new token is `tokens[b]`
        (a device tensor [B])."""
        cache, B = self.cache, len(blocks)
        key = self.bucket_of(B, lengths)
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = StepBucket(*key, cache.block_size, self.device)
        pad, W, scratch = b.batch - B, b.width, cache.scratch_block
        write = [cache._slots_of(row, n, 1)[0] for row, n in zip(blocks, lengths)]
        table = [i for row in blocks for i in row[:W] + [scratch] * (W - len(row[:W]))]
        to_device(lengths + [0] * pad + write + [scratch * cache.block_size] * pad
                  + table + [scratch] * (pad * W), self.device, out=b.inputs)
        b.tokens[:B, 0].copy_(tokens)            # padding rows keep whatever token they had
        cache.use_table(b.write, b.table, b.lengths)
        self.steps += 1
        b.steps += 1
        if not self.record or self.error is not None:
            return self._run(b)[:B]
        if b.graph is None:
            try:
                logits, b.graph = record_cuda_graph(lambda: self._run(b, into=b), pool=self.pool,
                                                    stream=self.stream)
            except GraphRecordingError as e:
                self.error = str(e)
                warnings.warn(f"recording the engine's decode step as a CUDA graph failed ({e}); "
                              "the engine runs eagerly from now on", RuntimeWarning, stacklevel=2)
                return self._run(b)[:B]
            return logits[:B]
        b.graph.replay()
        self.replays += 1
        return b.logits[:B]

    def _run(self, b: StepBucket, into: StepBucket | None = None) -> torch.Tensor:
        """The padded step, eagerly: logits [b.batch, V]. With `into`, they are kept as its
        output (the recording's outputs are what a replay fills)."""
        S = b.width * self.cache.block_size
        key_mask = torch.arange(S, device=self.device)[None, :] <= b.lengths[:, None]   # [B, S]
        logits = self.model(b.tokens, b.last_slot, self.cache, positions=b.lengths[:, None],
                            key_mask=key_mask)[:, -1]
        if into is not None:
            into.logits = logits
        return logits
