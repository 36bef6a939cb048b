"""Continuous batching: an engine that serves many requests at once (notebooks 04 and 13).

Static batching keeps a batch together until its longest sequence is done, so
slots of finished sequences idle. Continuous batching (Orca's iteration-level
scheduling, vLLM's engine) decides again at every decode step: finished
sequences leave, waiting ones join, and the batch stays full.

The pieces, one class per concept:
- `Sequence`   one request's state: its tokens, options, KV blocks and timings;
- `Scheduler`  the waiting and running queues, admission control and preemption;
- `BlockManager` (kv_cache.py) the free list and reference counts of KV blocks;
- `Engine`     the step loop on a background thread, and the thread-safe client API;
- `RequestHandle` what `engine.submit` returns: result(), stream(), cancel().

Memory is a pool of fixed-size KV blocks (`PagedKVCache` in ragged mode). A
sequence is admitted only when its tokens fit in free blocks; when the pool
runs dry mid-generation the newest running sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed (its
prompt plus the tokens it already generated are prefilled again) later.
"""
from __future__ import annotations

import itertools
import operator
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import torch

from .config import check_count
from .generate import (NO_PENALTIES, Generation, TextStream, _as_stop_list, _checked_request, _eos_ids,
                       not_finite_error, per_prompt_options, timing_stats)
from .cuda_graphs import EngineGraphs
from . import kv_cache
from .kv_cache import BlockManager, PagedKVCache, kv_bytes_per_token, to_device
from .config import ModelConfig
from .model import check_llmopt_model
from .sampling import apply_penalties_rows, check_penalties, checked_logit_bias, greedy, sample, seeded_generator
from .speculative import PromptLookup, verify_drafts

_DONE = object()   # end-of-stream marker in a handle's token queue
# the default KV cache holds max_batch_size sequences of this many tokens (or of the model's context
# when it is shorter: tiny's 2,048). Paged blocks go to whichever sequence needs them, so one may grow
# past it while others are short; a model with a long context (Llama 3.2: 131,072 tokens) would
# otherwise reserve 4 GB a slot (1B, bf16). Pass num_blocks for more.
SLOT_TOKENS = 4096
MAX_LOGPROBS = 20   # most likely alternatives a request may ask for at each token (OpenAI's limit)


class Sequence:
    """One request as the engine sees it."""

    def __init__(self, rid: int, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
                 top_k, top_p, seed, stop: list[str], eos: set[int], device,
                 logprobs: int | None = None, prompt_logprobs: bool = False, penalties: dict | None = None,
                 logit_bias: dict[int, float] | None = None) -> None:
        self.id = rid
        self.prompt_ids = prompt_ids
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = \
            max_new_tokens, temperature, top_k, top_p
        self.stop, self.eos = stop, eos
        self.logprobs = logprobs               # None, or how many alternatives to report at each token
        self.prompt_logprobs = prompt_logprobs
        self.token_logprobs: list[float] = []            # the model's log-probability of each new token
        self.top_logprobs: list[list[tuple[int, float]]] = []   # its `logprobs` most likely, at each
        self.prompt_lp: tuple[list, list] | None = None  # prompt_logprobs: (log-probabilities, top), once
        self.penalties = penalties             # presence, frequency, repetition penalties, when any is set
        self.slot: int | None = None           # with penalties: its row of the engine's token-count matrix
        self.logit_bias = logit_bias or None   # {token id: added to its logit}
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None   # the same on the device: (ids, values)
        # its own generator: a request's samples don't depend on its neighbours
        self.generator = seeded_generator(seed, temperature, device)
        self.generated: list[int] = []
        self.inflight = 0                      # tokens sampled on the device, not yet read (overlap)
        self.blocks: list[int] = []            # physical KV blocks, in logical order
        self.cached_tokens = 0                 # prompt tokens found in the prefix cache (or forked)
        self.computed: int | None = None       # while its prompt is prefilled in chunks: tokens done so far
        self.draft: list[int] = []             # speculation: this step's proposed tokens, to verify
        self.draft_cached = 0                  # with a draft transformer: tokens its cache holds for this row
        self.proposed = self.accepted = self.rejected = 0   # draft tokens, and verifications that rejected one
        self.siblings: list["Sequence"] = []   # samples of the same prompt that may fork from this one
        self.state = "waiting"                 # waiting, running, finished, failed, cancelled
        self.cancelled = False
        self.preemptions = 0
        self.finish_reason: str | None = None
        self.stop_text: str | None = None
        self.watch = None                      # a TextStream of its text, when it has stop strings
        self.submitted = time.perf_counter()
        self.first_scheduled: float | None = None
        self.token_times: list[float] = []     # seconds since submission
        self.future: Future = Future()
        self.tokens: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def num_tokens(self) -> int:                # len(all_ids), without building the list (every step)
        return len(self.prompt_ids) + len(self.generated)

    @property
    def last_token(self) -> int:
        return self.generated[-1] if self.generated else self.prompt_ids[-1]

    @property
    def wants_prompt_logprobs(self) -> bool:   # its prompt must be computed whole, in a forward of its own
        return self.prompt_logprobs and self.prompt_lp is None

    def __repr__(self) -> str:
        return f"Sequence(id={self.id}, {self.state}, {len(self.prompt_ids)}+{len(self.generated)} tokens)"


class RequestHandle:
    """The caller's side of one request: wait for it, stream it, or cancel it."""

    def __init__(self, seq: Sequence, engine: "Engine", tokenizer) -> None:
        self._seq, self._engine, self._tokenizer = seq, engine, tokenizer
        self.id = seq.id

    def result(self, timeout: float | None = None) -> Generation:
        """The finished `Generation`; raises the request's error, `CancelledError`, or `TimeoutError`."""
        return self._seq.future.result(timeout)

    def done(self) -> bool:
        return self._seq.future.done()

    def cancel(self) -> bool:
        """Ask the engine to drop this request; False if it had already finished."""
        if self._seq.future.done():
            return False
        self._seq.cancelled = True
        self._engine._wake()
        return True

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Yield the text of each new token as the engine produces it (decoded in the caller's thread).

        A handle streams once (with `stream` or `pieces`). Raises the request's error (or
        `CancelledError`) at the point it happened.
        """
        for piece in self.pieces(timeout):
            if piece.text:
                yield piece.text

    def pieces(self, timeout: float | None = None) -> Iterator["Piece"]:
        """Like `stream`, with the tokens behind each piece of text: a `Piece` each time there is
        new text, and a last one (text possibly "") for tokens whose text never showed (end of
        sequence, past a stop string). Their token ids (and log-probabilities, when the request
        asked for `logprobs`) join to the `Generation`'s. The server streams from here."""
        seq = self._seq
        text, start, end = TextStream(self._tokenizer, seq.stop), 0, 0
        while True:
            item = seq.tokens.get(timeout=timeout)
            if item is _DONE:
                seq.future.result()           # raises if the request failed or was cancelled
                text.flush()
                if text.flush_piece or end > start:
                    yield self._piece(text.flush_piece, start, end)
                return
            end += 1                          # the engine appended its log-probabilities before putting it
            if item in seq.eos or text.stopped:
                continue
            piece = text.push(item)
            if piece:
                yield self._piece(piece, start, end)
                start = end

    def _piece(self, text: str, start: int, end: int) -> "Piece":
        seq = self._seq
        if seq.logprobs is None:
            return Piece(text, seq.generated[start:end])
        return Piece(text, seq.generated[start:end], seq.token_logprobs[start:end], seq.top_logprobs[start:end])


@dataclass
class Piece:
    """A piece of a streamed reply (`RequestHandle.pieces`): its text and the tokens that made it."""
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None                   # when the request asked for them
    top_logprobs: list[list[tuple[int, float]]] | None = None


class PrefixCache:
    """Full KV blocks of earlier prompts, found by their tokens, shared by reference count.

    A block's key chains the keys of the blocks before it, so a block matches only
    when the whole prefix up to it is the same (vLLM's automatic prefix caching).
    The cache holds one reference to each block it knows, so a shared system prompt
    survives between requests; blocks only the cache holds are evicted, least
    recently used first, when the pool runs short.
    """

    def __init__(self, manager: BlockManager) -> None:
        from collections import OrderedDict
        self.manager = manager
        self.blocks: OrderedDict = OrderedDict()      # key -> physical block
        self.hit_tokens = 0

    def _keys(self, ids: list[int]):
        bs, key = self.manager.block_size, None
        for i in range(len(ids) // bs):
            key = hash((key, tuple(ids[i * bs:(i + 1) * bs])))
            yield key

    def match(self, ids: list[int]) -> list[int]:
        """Physical blocks holding the longest cached run of `ids`' full blocks."""
        found = []
        for key in self._keys(ids):
            block = self.blocks.get(key)
            if block is None:
                break
            self.blocks.move_to_end(key)
            found.append(block)
        return found

    def insert(self, ids: list[int], blocks: list[int]) -> list:
        """Remember the full blocks of `ids` (held in `blocks`) for later requests; returns the
        keys that were new."""
        added = []
        for key, block in zip(self._keys(ids), blocks):
            if key not in self.blocks:
                self.blocks[key] = block
                self.manager.share([block])
                added.append(key)
        return added

    def forget(self, keys: list) -> None:
        """Drop these keys (blocks whose contents were never computed) and their references."""
        for key in keys:
            if key in self.blocks:
                self.manager.release([self.blocks.pop(key)])

    def evict(self, n: int, keep=()) -> int:
        """Free up to `n` blocks that only the cache holds (not in `keep`); returns how many."""
        freed = 0
        for key in list(self.blocks):
            if freed >= n:
                break
            block = self.blocks[key]
            if self.manager.refcount[block] == 1 and block not in keep:
                del self.blocks[key]
                self.manager.release([block])
                freed += 1
        return freed

    def clear(self) -> None:
        for block in self.blocks.values():
            self.manager.release([block])
        self.blocks.clear()


class Scheduler:
    """Waiting and running queues over a block pool: who runs at the next step."""

    POLICIES = ("fcfs", "longest-first")

    def __init__(self, manager: BlockManager, max_batch_size: int, watermark_blocks: int = 0,
                 prefix_cache: PrefixCache | None = None, policy: str = "fcfs") -> None:
        if policy not in self.POLICIES:
            raise ValueError(f"policy must be one of {self.POLICIES}, got {policy!r}")
        self.policy = policy
        self.prefix_cache = prefix_cache
        self.manager = manager
        self.max_batch_size = max_batch_size
        self.watermark = watermark_blocks          # kept free at admission, so running rows can grow
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.copies: list[tuple[int, int, Sequence]] = []   # copy on write for this step (see grow)

    def add(self, seq: Sequence) -> None:
        """Queue a new request: at the back ("fcfs"), or ("longest-first") ahead of every new
        request with a smaller token budget, so the longest jobs start first and the short ones
        fill the gaps at the end (the classic rule for finishing a batch of jobs early). A
        preempted sequence stays at the front either way."""
        if self.policy == "fcfs":
            self.waiting.append(seq)
            return
        for i, other in enumerate(self.waiting):
            if other.preemptions == 0 and other.max_new_tokens < seq.max_new_tokens:
                self.waiting.insert(i, seq)
                return
        self.waiting.append(seq)

    def admit(self, limit: int | None = None) -> list[Sequence]:
        """Move waiting sequences, in queue order (see `add`), into free slots while their blocks
        fit (at most `limit` of them)."""
        admitted = []
        bs = self.manager.block_size
        while self.waiting and len(self.running) < self.max_batch_size and \
                (limit is None or len(admitted) < limit):
            seq = self.waiting[0]
            cached = self.prefix_cache.match(seq.all_ids) if self.prefix_cache and \
                not seq.wants_prompt_logprobs else []  # its every prompt position is computed
            if len(cached) * bs >= len(seq.all_ids):
                cached = cached[:-1]                    # compute at least the last token
            need = self.manager.blocks_needed(len(seq.all_ids) + 1) - len(cached)  # + the next token
            reserve = self.watermark if self.running else 0
            short = need + reserve - self.manager.num_free
            if short > 0 and self.prefix_cache is not None:
                self.prefix_cache.evict(short, keep=set(cached))
            if not self.manager.can_allocate(need + reserve):
                break                                   # head-of-line waits: no overtaking
            self.waiting.popleft()
            self.manager.share(cached)
            seq.blocks = cached + self.manager.allocate(need)
            seq.cached_tokens = len(cached) * bs
            if self.prefix_cache is not None:
                self.prefix_cache.hit_tokens += seq.cached_tokens
            seq.state = "running"
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Run waiting `child` (same prompt) on `parent`'s prompt blocks, shared by reference
        count, if a slot is free; the blocks are copied on write later (see `grow`)."""
        if len(self.running) >= self.max_batch_size or child not in self.waiting:
            return False
        self.waiting.remove(child)
        shared = parent.blocks[:self.manager.blocks_needed(len(child.prompt_ids))]   # the prompt's blocks
        self.manager.share(shared)
        child.blocks = list(shared)
        child.cached_tokens, child.state = len(child.prompt_ids), "running"
        self.running.append(child)
        return True

    def _one_block(self, seq: Sequence) -> int | None:
        """A free block (evicting from the prefix cache, then preempting the newest rows), or
        None when `seq` itself had to be preempted."""
        while True:
            if self.manager.can_allocate(1) or (self.prefix_cache and self.prefix_cache.evict(1)):
                return self.manager.allocate(1)[0]
            victim = self.running[-1]                   # the newest: it has done the least work
            self.preempt(victim)
            if victim is seq:
                return None

    def grow(self, rows: list[Sequence]) -> list[Sequence]:
        """Give every row a slot for its next token, preempting the newest rows when blocks run out.
        A row about to write into a block it shares (a forked sample's last prompt block) gets its
        own copy first: copy on write. The copies to make, (source, destination) blocks, are left
        in `self.copies` for the engine.

        Returns the rows that still run this step.
        """
        self.copies = []
        for seq in list(rows):
            if seq.state != "running":
                continue
            n = seq.num_tokens + seq.inflight        # tokens in the cache after this step
            while self.manager.blocks_needed(n) > len(seq.blocks):
                block = self._one_block(seq)
                if block is None:
                    break
                seq.blocks.append(block)
            if seq.state != "running":
                continue
            i = (n - 1) // self.manager.block_size   # the block this step writes
            shared = seq.blocks[i]
            if self.manager.refcount[shared] > 1:
                block = self._one_block(seq)
                if block is None:
                    continue
                seq.blocks[i] = block
                self.manager.release([shared])
                self.copies.append((shared, block, seq))
        self.copies = [c for c in self.copies if c[2].state == "running"]
        return [s for s in rows if s.state == "running"]

    def room_for(self, seq: Sequence, extra: int) -> int:
        """How many of `extra` more tokens (speculation's drafts) fit after this step's token: free
        blocks are taken while more than the watermark is left, but nothing is evicted or preempted
        for a guess."""
        n = seq.num_tokens + seq.inflight
        while (self.manager.blocks_needed(n + extra) > len(seq.blocks)
               and self.manager.can_allocate(1 + self.watermark)):
            seq.blocks += self.manager.allocate(1)
        return max(0, min(extra, len(seq.blocks) * self.manager.block_size - n))

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first; it is recomputed when readmitted."""
        self.remove(seq)
        seq.computed = None
        seq.slot = None                # counts rebuilt from its tokens: a sample still in flight is dropped
        seq.draft_cached = 0
        seq.state = "waiting"
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.manager.release(seq.blocks)
        seq.blocks = []


class Engine:
    """Continuous batching over a paged KV cache, driven by a background thread.

        with llmopt.Engine(model, tokenizer, max_batch_size=8) as engine:
            handle = engine.submit("ROMEO:", max_new_tokens=32)
            print(handle.result().text)

    `submit` is thread-safe and validates the request at once (a bad option
    raises there, in the caller). Options are those of `llmopt.generate`
    (max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos), per
    request. `num_blocks` x `block_size` tokens of KV cache are shared by all
    requests (default: enough for `max_batch_size` sequences of the model's full
    context or `SLOT_TOKENS` (4,096) tokens, whichever is shorter, so with tiny nothing is
    ever preempted); fewer blocks let admission control and preemption show. A
    sequence may reach `max_seq_len` tokens (default: the model's context) when the
    blocks hold it. With `prefix_caching`, full KV blocks of earlier prompts are
    kept and shared (by reference count) with later requests that start with the
    same tokens (a system prompt, or n samples of one prompt), so only the rest is
    prefilled. `policy` orders the waiting queue: "fcfs" (first come, first served)
    or "longest-first" (largest max_new_tokens first), which finishes a batch job
    of known lengths sooner but makes short requests wait behind long ones.
    With `overlap`, each decode step is launched from the previous step's tokens while
    they are still on the device, and those tokens are read back (scheduling, stop
    checks, detokenization) while the device computes the new step; on an asynchronous
    device (a GPU) the host work then hides behind the device's. Same tokens as without
    (except sampled rows that get preempted, whose dropped sample moved their generator);
    a row that ends on end-of-sequence or a stop string runs one extra, discarded step.
    With `keep_gathered` (the default), the running rows' KV blocks, gathered into order
    for attention, are kept from one decode step to the next and gathered again only when
    the batch changes; it costs memory for a second copy of the running rows' cache.
    `keep_gathered=False` gathers in every layer of every step (`cache.gathers` counts the
    kept copy's gathers).
    With `mixed_steps` (the default), newly admitted prompts run in the same forward as the
    decode step, beside the running rows (up to `max_prefill_tokens` prompt tokens a step,
    and at least one prompt), so a new request costs no forward of its own: every matmul
    runs once for all the step's tokens and only attention is split by group (Sarathi-Serve,
    vLLM). `mixed_steps=False` prefills each new prompt in a forward of its own first.
    `engine.forwards` counts the model's forwards either way.
    With `chunked_prefill`, a prompt longer than what is left of the step's
    `max_prefill_tokens` is computed in chunks over several steps (Sarathi-Serve, vLLM), the
    prompts part-way through going first: a step never carries more than `max_prefill_tokens`
    prompt tokens, so a long prompt no longer stalls every running request's next token for
    the time of its whole prefill (notebook 13); its own first token comes a few steps later.
    With `cuda_graphs`, steps run as CUDA graphs, one recorded per bucket of shapes (rows,
    new tokens per row and key blocks per row, each rounded up to a power of two; mixed
    steps too, up to `graph_max_tokens` padded tokens) and replayed with the step's inputs copied into
    its buffers (`cuda_graphs.py`): on a GPU a small model's step then costs one launch
    instead of one per kernel. On a CPU the same padded steps run eagerly (slower: padding
    is real work there). `engine.graphs` counts what ran how.
    With `speculative` (a proposer: "lookup" for prompt lookup, an `NGramDraft`, the MLP draft
    `load_model("tiny-draft")[0]`, or any object with `propose(tokens, k)`; or a smaller llmopt
    model with the same tokenizer, `load_model("tiny-draft-llama")[0]`, whose keys and values go
    in a pool of its own under the same block ids), each decode step
    first proposes up to `num_speculative_tokens` tokens for every running row, and the step's
    one forward computes each row's last token and its drafts (in the mixed step's packed
    sequence, beside the new prompts); a row keeps the drafts up to the first the model rejects
    and one token of the model's own, so 1 to k + 1 tokens a step (`speculative.verify_drafts`:
    greedy output is unchanged, sampled output follows the same distribution; log-probabilities
    are read at every kept position; penalties and a logit bias apply at each verified position
    as plain decoding applies them, the drafts before it counted). Drafts only take free blocks
    (never preempting a row for a guess), and a proposer
    that fails costs its step the drafts, not a request. With `speculative_max_batch`, a step
    with more rows than that decodes without drafts: speculation pays at small batch and costs
    once the step is compute-bound (notebook 09 measures where; vLLM's disable_by_batch_size).
    `engine.drafted`, `.draft_accepted` and `.acceptance_rate` count them (per request:
    `Generation.stats`). It needs `overlap=False` (drafts are proposed from the last step's
    tokens, on the host); with `cuda_graphs`, verifying steps are mixed steps whose buckets keep
    every position's logits.
    A fault while serving one request fails that request only.
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, block_size: int = 16,
                 num_blocks: int | None = None, max_seq_len: int | None = None,
                 watermark: float = 0.01, prefix_caching: bool = False, metrics=None,
                 policy: str = "fcfs", overlap: bool = False, keep_gathered: bool = True,
                 mixed_steps: bool = True, max_prefill_tokens: int = 512, chunked_prefill: bool = False,
                 cuda_graphs: bool = False, graph_max_tokens: int = 1024, speculative=None,
                 num_speculative_tokens: int = 4, speculative_max_batch: int | None = None) -> None:
        for name, value, optional in (("max_batch_size", max_batch_size, False),
                                      ("max_prefill_tokens", max_prefill_tokens, False),
                                      ("graph_max_tokens", graph_max_tokens, False),
                                      ("num_speculative_tokens", num_speculative_tokens, False),
                                      ("speculative_max_batch", speculative_max_batch, True),
                                      ("block_size", block_size, False), ("num_blocks", num_blocks, True),
                                      ("max_seq_len", max_seq_len, True)):       # optional: None is the default
            check_count(value, name, optional=optional)
        if not isinstance(watermark, (int, float)) or not 0 <= watermark < 1:
            raise ValueError(f"watermark (share of blocks kept free for running sequences) must be in [0, 1), "
                             f"got {watermark!r}")
        for name, flag in (("overlap", overlap), ("keep_gathered", keep_gathered), ("mixed_steps", mixed_steps),
                           ("chunked_prefill", chunked_prefill), ("cuda_graphs", cuda_graphs)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.overlap = overlap
        if chunked_prefill and not mixed_steps:
            raise ValueError("chunked_prefill runs prompt chunks inside decode steps: it needs mixed_steps=True")
        self.mixed_steps, self.max_prefill_tokens = mixed_steps, max_prefill_tokens
        self.chunked_prefill = chunked_prefill
        self._prefill_separately = False       # once, after a mixed step failed (see _decode)
        self._registered: list = []            # prefix-cache keys registered by this step's admissions
        self._inflight = None                  # overlap: (rows, tokens on device, host copy, event)
        check_llmopt_model(model, "Engine")
        self.model, self.tokenizer = model, tokenizer
        self.proposer = _checked_proposer(speculative, model, overlap)
        self.num_speculative_tokens, self.speculative_max_batch = num_speculative_tokens, speculative_max_batch
        self.drafted = self.draft_accepted = self.draft_rejected = 0   # speculation: tokens, rejecting rows
        self.proposer_errors = 0                                      # steps whose proposer raised
        self._counts = self._seen = None       # penalties: [max_batch_size, V] token counts and prompt tokens
        cfg = model.config
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        num_blocks = num_blocks or max_batch_size * -(-min(self.max_seq_len, SLOT_TOKENS) // block_size)
        draft = self.proposer if isinstance(getattr(self.proposer, "config", None), ModelConfig) else None
        _check_cache_fits(cfg, model, num_blocks, block_size, draft)
        self.cache = PagedKVCache(cfg, max_batch_size, self.max_seq_len, block_size=block_size,
                                  num_blocks=num_blocks, device=model.device, dtype=model.dtype,
                                  keep_gathered=keep_gathered, scratch_block=cuda_graphs)
        # a draft transformer keeps its keys and values in a pool of its own under the same block ids, so
        # a sequence's blocks serve both models; `seq.draft_cached` says how far the draft's are computed
        self.draft_model, self.draft_cache, self.draft_forwards = draft, None, 0
        if draft is not None:
            self.draft_cache = PagedKVCache(draft.config, max_batch_size, self.max_seq_len, block_size=block_size,
                                            device=model.device, dtype=draft.dtype, manager=self.cache.manager)
        self.graphs = EngineGraphs(model, self.cache, max_batch_size, graph_max_tokens) if cuda_graphs else None
        self.prefix_cache = PrefixCache(self.cache.manager) if prefix_caching else None
        self.scheduler = Scheduler(self.cache.manager, max_batch_size,
                                   watermark_blocks=int(watermark * num_blocks), prefix_cache=self.prefix_cache,
                                   policy=policy)
        self.metrics = metrics                 # an EngineMetrics (Prometheus), optional
        self._ids = itertools.count()
        self._inbox: deque[Sequence] = deque()
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()     # one stepper at a time: the thread or generate_many
        self._closing = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.steps = 0
        self.forwards = 0                      # model forwards: steps, plus separate prefills
        self.tokens_generated = 0
        self.forks = 0                         # samples that took a sibling's prompt blocks
        self.blocks_copied = 0                 # copy-on-write block copies
        self.step_log: list[dict] = []        # per step: time, rows, blocks in use, waiting

    # ---- client side -------------------------------------------------------------------------
    def submit(self, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop=None, ignore_eos: bool = False, logprobs: int | None = None,
               prompt_logprobs: bool = False, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               repetition_penalty: float = 1.0, logit_bias: dict[int, float] | None = None) -> RequestHandle:
        """Queue one request; returns its handle at once (thread-safe).

        `logprobs=k` also reports the model's log-probability of each new token and of its k most
        likely alternatives (k from 0 to `MAX_LOGPROBS`; `Generation.logprobs`, `.top_logprobs`):
        log_softmax of the model's logits, before temperature, top-k or top-p shape what is sampled
        (vLLM's default). `prompt_logprobs=True` does the same for every prompt token after the first
        (`Generation.prompt_logprobs`, the first entry None), to score a text: such a prompt is computed
        whole, in a forward of its own that keeps every position's logits, never from the prefix cache.
        `presence_penalty`, `frequency_penalty` (OpenAI's: on the tokens generated so far) and
        `repetition_penalty` (transformers': on the prompt's too) discourage repeats before sampling
        (`sampling.apply_penalties`); `logit_bias` ({token id: -100 to 100}, OpenAI's) is added to those
        tokens' logits (-100 bans a token, 100 all but forces it). The log-probabilities reported stay
        the model's own.
        """
        seq = self._new_sequence(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop=stop, ignore_eos=ignore_eos,
                                 logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 repetition_penalty=repetition_penalty, logit_bias=logit_bias)
        with self._cv:
            if self._closing:
                raise RuntimeError("this Engine is closed: submit to a new Engine")
            if self.error is not None:
                raise RuntimeError(f"this Engine stopped after an internal error: {self.error!r}")
            self._inbox.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llmopt-engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        if self.metrics is not None:
            self.metrics.submitted()
        return RequestHandle(seq, self, self.tokenizer)

    def _new_sequence(self, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                      stop=None, ignore_eos: bool = False, logprobs: int | None = None,
                      prompt_logprobs: bool = False, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                      repetition_penalty: float = 1.0, logit_bias: dict[int, float] | None = None) -> Sequence:
        """Validate one request (raising in the caller) and make its Sequence."""
        ids = _checked_request(self.model, self.tokenizer, prompt, max_new_tokens, temperature,
                               top_k, top_p, "paged", seed=seed)
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer from 0 (the chosen token's only) to "
                             f"{MAX_LOGPROBS} (that many alternatives too), got {logprobs!r}")
        if not isinstance(prompt_logprobs, bool):
            raise ValueError(f"prompt_logprobs must be True or False, got {prompt_logprobs!r}")
        check_penalties(presence_penalty, frequency_penalty, repetition_penalty)
        logit_bias = checked_logit_bias(logit_bias, self.model.config.vocab_size)
        penalties = dict(presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                         repetition_penalty=repetition_penalty)
        total = len(ids) + max_new_tokens
        capacity = self.cache.manager.num_blocks * self.cache.block_size
        if total > min(self.max_seq_len, capacity):
            raise ValueError(f"request needs {total} tokens of KV cache but this engine holds at most "
                             f"{min(self.max_seq_len, capacity)} per sequence: shorten the prompt, "
                             "lower max_new_tokens, or give the engine more num_blocks")
        return Sequence(next(self._ids), ids, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop=_as_stop_list(stop),
                        eos=_eos_ids(self.tokenizer, ignore_eos), device=self.model.device,
                        logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                        penalties=penalties if penalties != NO_PENALTIES else None, logit_bias=logit_bias)

    def generate_many(self, prompts, **options) -> list[Generation]:
        """Offline batch mode: serve every prompt and return the results in order.

        `options` apply to every prompt; `max_new_tokens` and `seed` may be lists
        (one per prompt). When no background thread has started (nothing was
        `submit`ted), the steps run in the calling thread, as offline inference
        does (vLLM's `LLM.generate`): on CPU, PyTorch ops run noticeably slower
        from a second Python thread, so this is the fast path for batch jobs.
        """
        seqs = [self._new_sequence(p, **o) for p, o in zip(prompts, per_prompt_options(len(prompts), options))]
        return self._serve(seqs)

    def sample_n(self, prompt, n: int, *, seed: int | None = None, **options) -> list[Generation]:
        """`n` samples of one prompt (sample i seeded `seed + i`), offline like `generate_many`.

        The prompt is prefilled once: the other samples fork from it, sharing its KV blocks
        by reference count and drawing their first token from its logits. A shared block is
        copied when a sample first writes into it (copy on write), so only the prompt's last,
        partly filled block is ever duplicated. Samples that find no free slot at that moment
        run later on their own (through the prefix cache when it is on). Output equals n
        separate runs with those seeds. `engine.forks` and `engine.blocks_copied` count both.
        """
        check_count(n, "n (samples per prompt)")
        if "max_new_tokens" in options and isinstance(options["max_new_tokens"], (list, tuple)):
            raise ValueError("sample_n takes one max_new_tokens for all samples")
        seqs = [self._new_sequence(prompt, seed=s, **options) for s in sample_seeds(seed, n)]
        for s in seqs:
            s.siblings = [o for o in seqs if o is not s]
        return self._serve(seqs)

    def _serve(self, seqs: list[Sequence]) -> list[Generation]:
        """Queue `seqs` and return their results in order, stepping in this thread when no
        background thread runs."""
        with self._cv:
            if self._closing:
                raise RuntimeError("this Engine is closed: submit to a new Engine")
            background = self._thread is not None
            self._inbox.extend(seqs)
            self._cv.notify()
        if not background:
            with torch.inference_mode(), self._step_lock:
                last = seqs[-1]
                while True:
                    while not last.future.done():   # the newest finishes last, or nearly
                        self._step()
                    pending = [s for s in seqs if not s.future.done()]
                    if not pending:
                        break
                    last = pending[-1]
        return [s.future.result() for s in seqs]

    def close(self, wait: bool = True) -> None:
        """Stop accepting requests. With `wait`, finish every queued and running one first;
        otherwise cancel them. Idempotent."""
        with self._cv:
            self._closing = True
            self._drain = self._drain and wait
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(wait=True)

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- the loop -----------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.waiting or self.scheduler.running
                    or self._inflight is not None)

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not self._has_work() and not self._closing:
                            self._cv.wait()
                        if self._closing and (not self._drain or not self._has_work()):
                            break
                    with self._step_lock:
                        self._step()
        except BaseException as e:   # an engine bug must not leave callers waiting forever
            self.error = e
            self._closing = True
        finally:
            reason = self.error or CancelledError("the engine was closed before this request ran")
            with self._cv:
                leftover = list(self._inbox) + list(self.scheduler.waiting) + list(self.scheduler.running)
                self._inbox.clear()
            for seq in leftover:
                self._finish(seq, "cancelled", error=reason)
            self._inflight = None             # a step still in flight belongs to cancelled rows only

    def _step(self) -> None:
        """One iteration: take new requests, drop cancelled ones, prefill the admitted, decode the rest."""
        sched = self.scheduler
        with self._cv:
            while self._inbox:
                sched.add(self._inbox.popleft())
        for seq in [s for s in list(sched.waiting) + sched.running if s.cancelled]:
            self._finish(seq, "cancelled", error=CancelledError(f"request {seq.id} was cancelled"))
        decode_rows = [s for s in sched.running if s.computed is None]   # not part-way through a prompt
        if self.overlap:   # a row whose last token is already being computed needs no further step
            decode_rows = [s for s in decode_rows if len(s.generated) + s.inflight < s.max_new_tokens]
        # the running rows get their next token's blocks first; new sequences take what is left
        rows = sched.grow(decode_rows)
        if sched.copies:
            self.cache.copy_blocks([(a, b) for a, b, _ in sched.copies])
            if self.draft_cache is not None:
                self.draft_cache.copy_blocks([(a, b) for a, b, _ in sched.copies])
            self.blocks_copied += len(sched.copies)
        admitted, joining = self._admit()
        if self.proposer is not None:
            self._propose(rows)
        if rows or joining or self._inflight is not None:
            self._decode(rows, joining)
        if not sched.running:
            self.cache.drop_gathered()         # nothing runs: free the kept copy of the rows
        self.steps += 1
        self.step_log.append(dict(t=time.perf_counter(), rows=len(rows), prefills=len(admitted),
                                  prefill_tokens=sum(chunk for _, chunk in joining), drafted=self.drafted,
                                  blocks_used=self.cache.manager.num_blocks - self.cache.manager.num_free,
                                  waiting=len(sched.waiting), preemptions=sched.preemptions))
        if self.metrics is not None:
            self.metrics.step(self)

    def _admit(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """Admit waiting sequences into free slots: (admitted, joining). With mixed steps the
        admitted join this step's forward (`joining`: each with the prompt tokens it computes
        now) up to `max_prefill_tokens` prompt tokens; otherwise (or once after a mixed step
        failed) each is prefilled now, in a forward of its own, so a fault stays with its
        request. With `chunked_prefill` a prompt takes no more than the tokens left in that
        budget and finishes in later steps, the ones part-way through going first."""
        sched, admitted, joining = self.scheduler, [], []
        separate = not self.mixed_steps or self._prefill_separately
        self._prefill_separately = False
        self._registered = []                  # prefix-cache keys of joining prompts, not yet computed
        budget = self.max_prefill_tokens
        for seq in [s for s in sched.running if s.computed is not None]:      # chunked, part-way
            if budget <= 0:
                break
            chunk = min(seq.num_tokens - seq.computed, budget)
            joining.append((seq, chunk))
            budget -= chunk
            self._register(seq, chunk)
        # one at a time: each admission registers its prompt's blocks in the prefix cache before
        # the next looks them up. A joining prompt registers them now, before they are computed:
        # a later prompt of this step that shares them reads them in the same forward, after
        # every layer has written its new keys (PagedKVCache.attend)
        while budget > 0 and sched.waiting:
            if any(sched.waiting[0] in j.siblings for j, _ in joining):
                break                     # a sample of a joining prompt forks from it after the step
            if not (new := sched.admit(limit=1)):
                break
            seq = new[0]
            if seq.first_scheduled is None:
                seq.first_scheduled = time.perf_counter()
            admitted.append(seq)
            if separate or seq.wants_prompt_logprobs:
                self._prefill(seq)
                continue
            seq.computed = seq.cached_tokens
            rest = seq.num_tokens - seq.computed
            chunk = min(rest, budget) if self.chunked_prefill else rest
            joining.append((seq, chunk))
            budget -= chunk
            self._register(seq, chunk)
        return admitted, joining

    def _register(self, seq: Sequence, chunk: int) -> None:
        """Put the prompt blocks `seq` will have computed after this step (`chunk` more tokens) in
        the prefix cache (a later prompt of the same step that shares them reads them after every
        layer has written them: PagedKVCache.attend)."""
        if self.prefix_cache is not None:
            done = seq.prompt_ids[:seq.computed + chunk]
            self._registered += self.prefix_cache.insert(done, seq.blocks)

    @property
    def acceptance_rate(self) -> float:
        """Speculation: accepted draft tokens / draft tokens checked (a rejection ends a row's
        verification, so the drafts after it are never checked), as `speculative_generate` counts."""
        checked = self.draft_accepted + self.draft_rejected
        return self.draft_accepted / checked if checked else 0.0

    def _propose(self, rows: list[Sequence]) -> None:
        """Speculation: each row's drafts for this step (`seq.draft`), as many as its token budget
        and the free blocks allow; none at all when more rows run than `speculative_max_batch`."""
        want = []
        busy = self.speculative_max_batch is not None and len(rows) > self.speculative_max_batch
        for seq in rows:
            seq.draft = []
            if busy:
                continue
            room = min(self.num_speculative_tokens, seq.max_new_tokens - len(seq.generated) - 1)
            if room > 0:
                want.append((seq, room))
        if not want:
            return
        try:
            if self.draft_model is not None:
                self._model_drafts(want)
                return
            if hasattr(self.proposer, "propose_many"):              # one batched call (the MLP draft)
                drafts = self.proposer.propose_many([s.all_ids for s, _ in want], [room for _, room in want])
            else:
                drafts = [self.proposer.propose(s.all_ids, room) for s, room in want]
            drafts = [_valid_draft(d, room, self.model.config.vocab_size) for d, (_, room) in zip(drafts, want)]
        except Exception as e:     # drafts are a guess: a proposer's fault costs this step its drafts, no request
            self.proposer_errors += 1
            if self.proposer_errors == 1:
                warnings.warn(f"the speculative proposer failed ({type(e).__name__}: {e}); the engine decodes "
                              "without drafts whenever it fails (engine.proposer_errors counts the steps)")
            return
        for (seq, room), draft in zip(want, drafts):
            seq.draft = draft[:self.scheduler.room_for(seq, len(draft))] if draft else []

    def _model_drafts(self, want: list[tuple[Sequence, int]]) -> None:
        """A draft transformer's greedy guesses for the rows of `want` ((sequence, most drafts)), over its own paged
        cache: one forward catches every row's draft cache up (the tokens since it last ran, at least the row's
        last token, all rows packed as a mixed step's prompts are), giving each its first guess; then one batched
        decode step per further guess. Its keys and values are written into the rows' blocks, so the room for
        them is taken first. `seq.draft_cached` ends past the last guess fed; `_verify` cuts it back to what was
        accepted."""
        draft, cache = self.draft_model, self.draft_cache
        seqs, rooms = [], []
        for seq, room in want:
            room = min(room, draft.config.max_seq_len + 1 - seq.num_tokens)       # the draft's context
            room = self.scheduler.room_for(seq, room) if room > 0 else 0
            if room > 0:
                seqs.append(seq)
                rooms.append(room)
        if not seqs:
            return
        device = self.model.device
        chunks = [seq.all_ids[seq.draft_cached:] for seq in seqs]
        pos = cache.set_mixed([], [], [(s.blocks, s.draft_cached, len(c)) for s, c in zip(seqs, chunks)])
        ends = list(itertools.accumulate(len(c) for c in chunks))
        logits = draft(to_device([t for c in chunks for t in c], device)[None], pos, cache, positions=pos[None],
                       logits_to_keep=to_device([e - 1 for e in ends], device))[0]
        self.draft_forwards += 1
        out = torch.zeros(len(seqs), max(rooms), dtype=torch.long, device=device)
        out[:, 0] = greedy(logits)
        for i in range(1, max(rooms)):                                     # guess i + 1 from guess i
            live = [r for r in range(len(seqs)) if rooms[r] > i]
            at = to_device(live, device)
            logits = _decode_rows(draft, cache, [seqs[r].blocks for r in live],
                                  [seqs[r].num_tokens + i - 1 for r in live], out[at, i - 1][:, None])
            self.draft_forwards += 1
            out[at, i] = greedy(logits)
        for seq, room, guesses in zip(seqs, rooms, out.tolist()):          # one copy to the host
            seq.draft = guesses[:room]
            seq.draft_cached = seq.num_tokens + room - 1

    def _prefill(self, seq: Sequence) -> None:
        """Compute a newly admitted (or readmitted) sequence's KV cache and its next token."""
        try:
            start = seq.cached_tokens                 # the prefix cache already holds these
            ids = to_device([seq.all_ids[start:]], self.model.device)
            self.cache.set_rows([seq.blocks], [start], new_tokens=ids.shape[1])
            pos = torch.arange(start, start + ids.shape[1], device=ids.device)
            self.forwards += 1
            every = seq.wants_prompt_logprobs      # (then nothing was taken from the prefix cache)
            logits = self.model(ids, pos, self.cache, last_only=not every)[0]      # [T or 1, V]
            if every:
                seq.prompt_lp = self._prompt_logprobs(seq, logits)
            if self.prefix_cache is not None:      # computed: later prompts may share its blocks
                self.prefix_cache.insert(seq.prompt_ids, seq.blocks)
            self._read_back(self._sample_and_launch(*self._started([], [seq], logits[-1:])))
        except Exception as e:
            self._finish(seq, "failed", error=e)

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> tuple[list, list]:
        """Each prompt token's log-probability given the tokens before it (None for the first), and its
        `seq.logprobs` most likely alternatives (from logits [T, V] at every prompt position). A few
        hundred positions at a time: the fp32 copy of a long prompt's logits is T x V floats."""
        ids = seq.prompt_ids
        lps, tops = [None], [None]
        target = to_device(ids[1:], logits.device)
        for a in range(0, len(ids) - 1, 256):
            lp = logits[a:min(a + 256, len(ids) - 1)].float().log_softmax(-1)
            lps += lp.gather(-1, target[a:a + len(lp), None])[:, 0].tolist()
            if seq.logprobs:
                top = lp.topk(seq.logprobs, dim=-1)
                tops += [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        return lps, tops if seq.logprobs else None

    def _started(self, rows: list[Sequence], new: list[Sequence], logits: torch.Tensor):
        """After a forward that computed the prompts of `new` (logits: one row per sequence of
        rows + new): fork samples of the same prompt still waiting. A fork shares its prompt's
        blocks and draws its first token from the same logits, with its own generator. Returns
        the rows to sample and their logits."""
        index = list(range(len(rows)))
        rows = list(rows)
        for i, seq in enumerate(new, start=len(rows)):
            forks = [c for c in seq.siblings if not seq.generated and not c.generated
                     and not c.cancelled and self.scheduler.fork(seq, c)]
            for c in forks:
                c.first_scheduled = time.perf_counter()
                c.prompt_lp = seq.prompt_lp
                self.forks += 1
            rows += [seq] + forks
            index += [i] * (1 + len(forks))
        if len(index) == logits.shape[0]:
            return rows, logits
        return rows, logits[to_device(index, logits.device)]

    def _decode(self, rows: list[Sequence], joining: list[tuple[Sequence, int]] = ()) -> None:
        """One token for every running row, in one batched forward over the paged cache (with
        the prompts of `joining` beside them: a mixed step), read back at once. With overlap
        the step starts from the previous step's tokens while they are still on the device,
        and the previous step is read back only after this one is launched, so the host
        accepts its tokens while the device computes."""
        prev, self._inflight = self._inflight, None
        launched = None
        if rows or joining:
            # speculation (never with overlap): rows with as many drafts share an attention group (set_mixed)
            drafting = sorted((s for s in rows if s.draft), key=lambda s: len(s.draft))
            plain = [s for s in rows if not s.draft] if drafting else rows
            try:
                tokens = to_device([s.last_token for s in plain], self.model.device)  # host-known
                if prev is not None:                   # rows whose last token is still on the device
                    where = {id(s): i for i, s in enumerate(prev[0])}
                    pairs = [(r, where[id(s)]) for r, s in enumerate(plain) if s.inflight]
                    if pairs:
                        dst, src = (to_device(list(i), tokens.device) for i in zip(*pairs))
                        tokens[dst] = prev[1][src]
                lengths = [s.num_tokens - 1 + s.inflight for s in plain]        # tokens cached per row
                if drafting:
                    logits = self._forward_mixed(plain, lengths, tokens, joining, verify=drafting)
                elif joining:
                    logits = self._forward_mixed(plain, lengths, tokens, joining)
                else:
                    logits = self._forward_rows(plain, lengths, tokens[:, None])
            except Exception as e:
                self._read_back(prev)                 # settle the previous step first
                if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if joining:   # the new prompts wait and are prefilled on their own next step
                    if self.prefix_cache is not None:
                        self.prefix_cache.forget(self._registered)
                    for seq, _ in reversed(joining):
                        self.scheduler.preempt(seq)
                    self._prefill_separately = True
                elif len(rows) == 1:
                    self._finish(rows[0], "failed", error=e)
                else:   # shrink the batch: the newest half waits and is recomputed later
                    for seq in rows[len(rows) // 2:]:
                        self.scheduler.preempt(seq)
                return
            if drafting:             # their tokens are accepted now; the other rows' and prompts' logits remain
                logits = self._verify(drafting, logits)
            launched = self._sample_and_launch(*self._started(plain, *self._prefilled(plain, joining, logits)))
        if self.overlap:
            self._inflight = launched
            self._read_back(prev)
        else:
            self._read_back(launched)

    def _sample_and_launch(self, rows: list[Sequence], logits: torch.Tensor):
        """Sample the rows' next tokens from their logits [B, V] and start reading them back (with the
        log-probabilities asked for); `_read_back` accepts them."""
        out, finite = self._sample_tensor(rows, logits)
        return self._launch_read(rows, out, finite, self._logprobs(rows, logits, out))

    def _launch_read(self, rows: list[Sequence], out: torch.Tensor, finite: torch.Tensor, logprobs=None):
        """Start copying a step's tokens [B] (with whether each row's logits were finite, and
        `_logprobs`' tensors) to the host; on CUDA without waiting (pinned memory and an event, so a
        later wait covers this step only)."""
        event = None
        both = torch.stack([out, finite.to(out.dtype)])                      # [2, B]: one copy
        if out.device.type == "cuda":
            host = both.to("cpu", non_blocking=True)
            if logprobs is not None:
                logprobs = [logprobs[0]] + [t.to("cpu", non_blocking=True) for t in logprobs[1:]]
            event = torch.cuda.Event()
            event.record()
        else:
            host = both.cpu()
        for s in rows:
            s.inflight += 1
        return rows, out, host, event, logprobs

    def _read_back(self, launched) -> None:
        """Wait for a launched step and accept its tokens; rows that finished, were cancelled or
        were preempted since it was launched drop theirs."""
        if launched is None:
            return
        rows, _, host, event, logprobs = launched
        if event is not None:
            event.synchronize()
        found = {}                                   # row -> (log-probability, [(id, log-probability)])
        if logprobs is not None:
            at, chosen, top_ids, top_lps = (x if isinstance(x, list) else x.tolist() for x in logprobs)
            for j, i in enumerate(at):
                k = rows[i].logprobs
                found[i] = chosen[j], list(zip(top_ids[j][:k], top_lps[j][:k]))
        tokens, finite = host.tolist()
        for i, (seq, tok, ok) in enumerate(zip(rows, tokens, finite)):
            seq.inflight -= 1
            if seq.state != "running":
                continue
            if ok:
                self._accept(seq, tok, found.get(i))
            else:       # this request alone fails; the others go on
                self._finish(seq, "failed", error=self._not_finite(seq))

    @staticmethod
    def _not_finite(seq: Sequence) -> FloatingPointError:
        return not_finite_error(len(seq.generated) + 1, seq.id)

    def _prefilled(self, rows: list[Sequence], joining: list[tuple[Sequence, int]], logits: torch.Tensor):
        """After a forward with the prompt chunks of `joining`: the sequences whose prompts are now
        whole, and the logits of the rows and of those (a part-way chunk's are dropped)."""
        done, keep = [], list(range(len(rows)))
        for i, (seq, chunk) in enumerate(joining, start=len(rows)):
            seq.computed += chunk
            if seq.computed == seq.num_tokens:
                seq.computed = None
                done.append(seq)
                keep.append(i)
        if len(keep) == logits.shape[0]:
            return done, logits
        return done, logits[to_device(keep, logits.device)]

    def _verify(self, rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Speculation: accept each of `rows`' tokens from the model's logits at its last token and
        its drafts (the last rows of `logits`, 1 + len(draft) each, row after row): the drafts up to
        the first the model rejects, then the model's own token (`verify_drafts`). A row whose logits
        are not finite fails alone. Returns the logits before them (the other rows' and prompts')."""
        n = sum(1 + len(s.draft) for s in rows)
        mine, logits = logits[-n:], logits[:-n]
        finite = mine.sum(-1, dtype=torch.float32).isfinite()
        best, ok = torch.stack([greedy(torch.nan_to_num(mine)), finite.long()]).tolist()   # one copy
        at = 0
        for seq in rows:
            draft, end = seq.draft, at + 1 + len(seq.draft)
            seq.draft = []
            if not all(ok[at:end]):
                self._finish(seq, "failed", error=self._not_finite(seq))
            elif seq.state == "running":
                here, picks = mine[at:end], best[at:end]
                if seq.penalties is not None or seq.logit_bias:     # adjusted as plain decoding would, each position
                    here = self._adjusted_positions(seq, here, draft)
                    picks = greedy(here).tolist() if seq.temperature == 0 else None
                tokens, n_ok = verify_drafts(here, draft, temperature=seq.temperature, top_k=seq.top_k,
                                             top_p=seq.top_p, generator=seq.generator, best=picks)
                if seq.penalties is not None:                       # the kept tokens, counted
                    self._counts.index_put_((to_device([seq.slot] * len(tokens), here.device),
                                             to_device(tokens, here.device)),
                                            torch.ones(len(tokens), device=here.device), accumulate=True)
                seq.proposed += len(draft)
                seq.accepted += n_ok
                seq.rejected += n_ok < len(draft)
                self.drafted += len(draft)
                self.draft_accepted += n_ok
                self.draft_rejected += n_ok < len(draft)
                if self.draft_model is not None:          # the draft's cache holds the accepted guesses only
                    seq.draft_cached = min(seq.draft_cached, seq.num_tokens + n_ok)
                found = self._verified_logprobs(seq, mine[at:at + len(tokens)], tokens)
                for j, tok in enumerate(tokens):
                    self._accept(seq, tok, found[j] if found else None)
                    if seq.state != "running":
                        break
            at = end
        return logits

    def _adjusted_positions(self, seq: Sequence, logits: torch.Tensor, draft: list[int]) -> torch.Tensor:
        """A verifying row's logits at its last token and each draft [m + 1, V] with its penalties and logit bias
        applied as plain decoding would apply them there: position j counts drafts[:j] as generated, on top
        of the row's token counts (`_adjust`'s arithmetic)."""
        logits = logits.float()
        m, device = len(draft), logits.device
        if seq.penalties is not None:
            slot = self._count_slots([seq], logits.shape[-1], device)[0]
            counts = self._counts[slot].repeat(m + 1, 1)
            if m:        # draft i counts from position i + 1 on
                at = [(j, draft[i]) for i in range(m) for j in range(i + 1, m + 1)]
                counts.index_put_(tuple(to_device(list(x), device) for x in zip(*at)),
                                  torch.ones(len(at), device=device), accumulate=True)
            logits = apply_penalties_rows(logits, counts, self._seen[slot].expand(m + 1, -1),
                                          *_penalty_params([seq], device))
        if seq.logit_bias:
            ids, values = _bias_tensors(seq, device)
            logits = logits.index_add(1, ids, values.expand(m + 1, -1))
        return logits

    @staticmethod
    def _verified_logprobs(seq: Sequence, logits: torch.Tensor, tokens: list[int]):
        """A verified row's log-probabilities, when it asked: for each kept token, the model's own log-probability
        of it and of the `seq.logprobs` likeliest tokens there (logits [len(tokens), V]); else None."""
        if seq.logprobs is None:
            return None
        lp = logits.float().log_softmax(-1)
        chosen = lp.gather(-1, to_device(tokens, lp.device)[:, None])[:, 0].tolist()
        top = lp.topk(seq.logprobs, dim=-1)
        return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top.indices.tolist(), top.values.tolist())]

    def _forward_rows(self, rows: list[Sequence], lengths: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for one new token per row (tokens [B, 1]); row b has lengths[b] tokens cached."""
        if self.graphs is not None:
            self.forwards += 1
            return self.graphs.forward([s.blocks for s in rows], lengths, tokens[:, 0])
        self.forwards += 1
        return _decode_rows(self.model, self.cache, [s.blocks for s in rows], lengths, tokens)

    def _forward_mixed(self, rows: list[Sequence], lengths: list[int], tokens: torch.Tensor,
                       joining: list[tuple[Sequence, int]], verify: list[Sequence] = ()) -> torch.Tensor:
        """Logits [B + J, V]: one new token per row (tokens [B]) and a chunk of each joining
        sequence's prompt (all of it, without chunked prefill), in one forward of a single packed
        sequence (PagedKVCache.set_mixed). Speculation's `verify` rows come after them, each with its
        last token and its drafts, and keep the logits at every one of those positions."""
        device = self.model.device
        seqs = [s for s, _ in joining]
        starts = [s.computed for s in seqs] + [s.num_tokens - 1 for s in verify]
        prompts = [s.all_ids[s.computed:s.computed + chunk] for s, chunk in joining]
        prompts += [[s.last_token] + s.draft for s in verify]
        seqs += list(verify)
        if self.graphs is not None and self.graphs.fits(len(rows) + len(seqs), max(map(len, prompts))):
            self.forwards += 1
            logits = self.graphs.forward([s.blocks for s in rows + seqs], lengths + starts, tokens, prompts,
                                         every=bool(verify))
            if not verify:
                return logits
            # [R, Q, V], each row's new tokens in its last positions: the last, or a verified row's every one
            n = len(rows) + len(joining)
            verified = [logits[n + i, -(1 + len(s.draft)):] for i, s in enumerate(verify)]
            return torch.cat([logits[:n, -1], *verified])
        chunks = [(s.blocks, start, len(p)) for s, start, p in zip(seqs, starts, prompts)]
        pos = self.cache.set_mixed([s.blocks for s in rows], lengths, chunks)
        ids = torch.cat([tokens, to_device([t for p in prompts for t in p], device)])[None]
        ends, n = [], len(rows)
        for i, p in enumerate(prompts):
            if i < len(joining):               # a prompt's last token gives its first new one
                ends.append(n + len(p) - 1)
            else:                              # a verified row: every position
                ends += range(n, n + len(p))
            n += len(p)
        keep = to_device(list(range(len(rows))) + ends, device)
        self.forwards += 1
        return self.model(ids, pos, self.cache, positions=pos[None], logits_to_keep=keep)[0]

    def _sample_tensor(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row [B], on the device: one argmax for the greedy rows, each sampled
        row with its generator; rows with penalties or a logit bias sample from their adjusted logits
        (a copy: the model's own stay for the log-probabilities; `_adjust`), and rows with penalties
        count their token, on the device.
        Also whether each row's logits were finite [B]: a row with NaN or inf (fp16 overflow, say)
        samples from finite stand-ins instead (`nan_to_num`), on the device, without a sync (a GPU's
        sampler would assert on it, which ends the process), and fails when read back."""
        finite = logits.sum(-1, dtype=torch.float32).isfinite()     # [B]; 8x cheaper than isfinite().all() on a CPU
        logits = torch.nan_to_num(logits)                             # a copy: the model's own stay as they were
        penalized = [i for i, s in enumerate(rows) if s.penalties is not None]
        biased = [i for i, s in enumerate(rows) if s.logit_bias]
        if penalized:            # their rows in the step and in the count matrix, on the device, once
            slots = self._count_slots([rows[i] for i in penalized], logits.shape[-1], logits.device)
            at, slots = to_device(penalized + slots, logits.device).split(len(penalized))
        if penalized or biased:
            logits = self._adjust(rows, logits.float(), (penalized, at, slots) if penalized else None, biased)
        out = greedy(logits)
        for i, seq in enumerate(rows):
            if seq.temperature > 0:
                out[i] = sample(logits[i:i + 1], seq.temperature, seq.top_k, seq.top_p, seq.generator)[0]
        if penalized:            # counted now, on the device: an overlapped next step sees it before the host
            self._counts.index_put_((slots, out[at]), torch.ones(len(penalized), device=out.device), accumulate=True)
        return out, finite

    def _adjust(self, rows: list[Sequence], logits: torch.Tensor, penalized: tuple | None,
                biased: list[int]) -> torch.Tensor:
        """The step's logits [B, V] (fp32) with the penalties of the penalized rows applied (`penalized`:
        their indices in the step, the same and their count-matrix rows on the device) and the logit bias of the
        rows `biased` added, all rows at once: each penalized sequence owns a row of the engine's
        token-count matrix (vLLM's persistent batch), so the step costs the same dozen operations for
        one such request or sixty-four, where a loop over them cost a dozen each."""
        device = logits.device
        if penalized is not None:
            where, at, slots = penalized
            logits[at] = apply_penalties_rows(logits[at], self._counts[slots], self._seen[slots],
                                              *_penalty_params([rows[i] for i in where], device))
        if biased:
            ids, values = (torch.cat(t) for t in zip(*(_bias_tensors(rows[i], device) for i in biased)))
            where = to_device([i for i in biased for _ in rows[i].logit_bias], device)
            logits.index_put_((where, ids), values, accumulate=True)
        return logits

    def _count_slots(self, seqs: list[Sequence], vocab: int, device) -> list[int]:
        """The count-matrix row of each penalized sequence: one it holds, or (the first time, or after a
        preemption dropped its counts) a row no running sequence holds, zeroed and filled from the tokens it
        generated, with its prompt's tokens marked seen (the repetition penalty's)."""
        if self._counts is None:
            n = self.scheduler.max_batch_size
            self._counts = torch.zeros(n, vocab, device=device)
            self._seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
            self._slot_owners: list[Sequence | None] = [None] * n
        owners = self._slot_owners
        for seq in seqs:
            if seq.slot is not None:
                continue
            i = next(i for i, o in enumerate(owners) if o is None or o.state != "running" or o.slot != i)
            owners[i], seq.slot = seq, i
            self._counts[i].zero_()
            self._seen[i].zero_()
            if seq.generated:
                self._counts[i].index_add_(0, to_device(seq.generated, device),
                                           torch.ones(len(seq.generated), device=device))
            self._seen[i, to_device(seq.prompt_ids, device)] = True
        return [seq.slot for seq in seqs]

    @staticmethod
    def _logprobs(rows: list[Sequence], logits: torch.Tensor, out: torch.Tensor):
        """For the rows that asked for `logprobs`, on the device: (their indices in `rows`, the
        log-probability of each one's sampled token, and the ids and log-probabilities of the most
        likely tokens, as many as the most any of them asked for); None when none asked."""
        at = [i for i, s in enumerate(rows) if s.logprobs is not None]
        if not at:
            return None
        where = to_device(at, logits.device)
        lp = logits[where].float().log_softmax(-1)                       # the model's own distribution
        chosen = lp.gather(-1, out[where][:, None])[:, 0]
        top = lp.topk(max(rows[i].logprobs for i in at), dim=-1)         # k = 0: empty
        return at, chosen, top.indices, top.values

    def _accept(self, seq: Sequence, tok: int, logprobs=None) -> None:
        """Record a token for `seq` (with its log-probabilities, when asked: `_logprobs`) and finish it on
        end-of-sequence, a stop string or its length."""
        try:
            if logprobs is not None:           # before the token is put: a stream reading it finds them
                seq.token_logprobs.append(logprobs[0])
                seq.top_logprobs.append(logprobs[1])
            seq.generated.append(tok)
            seq.token_times.append(time.perf_counter() - seq.submitted)
            seq.tokens.put(tok)
            self.tokens_generated += 1
            if tok in seq.eos:
                self._finish(seq, "eos")
            elif seq.stop and self._hit_stop(seq):
                self._finish(seq, "stop")
            elif len(seq.generated) >= seq.max_new_tokens:
                self._finish(seq, "length")
        except Exception as e:
            self._finish(seq, "failed", error=e)

    def _hit_stop(self, seq: Sequence) -> bool:
        """Whether the newest token completes one of `seq`'s stop strings (its text kept, cut before it)."""
        if seq.watch is None:
            seq.watch = TextStream(self.tokenizer, seq.stop)
        seq.watch.push(seq.generated[-1])
        if seq.watch.stopped:
            seq.stop_text = seq.watch.text
        return seq.watch.stopped

    def _finish(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        """Retire a sequence: free its blocks, and hand its result (or error) to the caller."""
        if seq.future.done():
            return
        if seq.blocks or seq in self.scheduler.running or seq in self.scheduler.waiting:
            self.scheduler.remove(seq)
        seq.finish_reason = reason
        if error is not None:
            seq.state = "cancelled" if isinstance(error, CancelledError) else "failed"
            seq.future.set_exception(error)
        else:
            seq.state = "finished"
            seq.future.set_result(self._result(seq))
        seq.tokens.put(_DONE)
        if self.metrics is not None:
            self.metrics.finished(seq)

    def _result(self, seq: Sequence) -> Generation:
        text = seq.stop_text
        if text is None:
            text = self.tokenizer.decode(seq.generated) if self.tokenizer is not None else ""
        stats = timing_stats(seq.token_times, len(seq.prompt_ids))
        stats.update(queue_s=(seq.first_scheduled or seq.submitted) - seq.submitted,
                     preemptions=seq.preemptions, cached_prompt_tokens=seq.cached_tokens, cache="paged",
                     device=str(self.model.device), dtype=str(self.model.dtype).removeprefix("torch."), compiled=False)
        if self.proposer is not None:
            checked = seq.accepted + seq.rejected
            stats.update(proposed=seq.proposed, accepted=seq.accepted,
                         acceptance_rate=seq.accepted / checked if checked else 0.0)
        extra = {}
        if seq.logprobs is not None:
            extra.update(logprobs=list(seq.token_logprobs), top_logprobs=list(seq.top_logprobs))
        if seq.prompt_lp is not None:
            extra.update(prompt_logprobs=seq.prompt_lp[0], prompt_top_logprobs=seq.prompt_lp[1])
        return Generation(token_ids=list(seq.generated), text=text, prompt_ids=seq.prompt_ids,
                          finish_reason=seq.finish_reason, stats=stats, token_times=seq.token_times, **extra)


def sample_seeds(seed: int | None, n: int) -> list[int]:
    """The seeds of n samples of one prompt: seed, seed + 1, ... (from a random start when seed is None)."""
    base = seed if seed is not None else int(torch.randint(0, 2**31 - n, ()).item())
    return [base + i for i in range(n)]


def _check_cache_fits(cfg, model, num_blocks: int, block_size: int, draft=None) -> None:
    """On a GPU, a clear error naming a `num_blocks` that fits, before a KV pool larger than the free
    memory is allocated (the default sizes it by slots, not by what the device has left: vLLM's
    gpu_memory_utilization sizes it from free memory instead). A draft transformer's pool counts too."""
    free = kv_cache.free_device_bytes(model.device)
    per_block = block_size * kv_bytes_per_token(cfg, model.dtype)
    if draft is not None:
        per_block += block_size * kv_bytes_per_token(draft.config, draft.dtype)
    if free is None or (num_blocks + 1) * per_block <= free:      # + 1: the CUDA graphs' scratch block
        return
    fits = int(0.9 * free) // per_block - 1
    fix = (f"pass num_blocks={fits} ({fits * block_size:,} tokens in all, 90% of what is free)" if fits > 0 else
           "free memory first (another model, cached allocations: torch.cuda.empty_cache())")
    raise ValueError(f"the engine's KV cache ({num_blocks:,} blocks of {block_size} tokens: "
                     f"{num_blocks * per_block / 2**30:.2f} GiB) does not fit in the {free / 2**30:.2f} GiB free on "
                     f"{model.device}: {fix}, or give the engine a smaller max_batch_size or max_seq_len")


def _penalty_params(seqs: list[Sequence], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The presence, frequency and repetition penalties of `seqs`, each [len(seqs), 1] on the device (one copy)."""
    params = to_device([[seq.penalties[k] for k in ("presence_penalty", "frequency_penalty", "repetition_penalty")]
                        for seq in seqs], device, dtype=torch.float32)
    return params.unsqueeze(-1).unbind(1)


def _bias_tensors(seq: Sequence, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`seq`'s logit bias as (token ids, values) on the device, made the first time it is needed."""
    if seq.bias is None:
        seq.bias = (to_device(list(seq.logit_bias), device),
                    to_device(list(seq.logit_bias.values()), device, dtype=torch.float32))
    return seq.bias


def _decode_rows(model, cache: PagedKVCache, blocks: list[list[int]], lengths: list[int],
                 tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of `model` for one new token per row (tokens [B, 1]) over the paged `cache`, row b owning
    `blocks[b]` and caching lengths[b] tokens (the engine's decode step, and its draft model's)."""
    device = model.device
    S = cache.set_rows(blocks, lengths)                                  # key slots attention reads
    lens = cache.row_lengths                                             # lengths, on the device
    key_mask = torch.arange(S, device=device)[None, :] <= lens[:, None]  # [B, S]
    return model(tokens, to_device([S - 1], device), cache, positions=lens[:, None], key_mask=key_mask)[:, -1]


def _valid_draft(draft, room: int, vocab_size: int) -> list[int]:
    """A proposer's tokens as a list of at most `room` ids, cut at the first that is not a token id of the
    model (a wrong id would fail the whole step's forward)."""
    out = []
    for t in list(draft)[:room]:
        try:
            t = operator.index(t)               # ints, and numpy's or torch's integer scalars
        except TypeError:
            break
        if not 0 <= t < vocab_size:
            break
        out.append(t)
    return out


def _checked_proposer(speculative, model, overlap: bool):
    """The engine's draft proposer (None without speculation), or a clear error."""
    if speculative is None:
        return None
    if isinstance(speculative, str):
        if speculative != "lookup":
            raise ValueError(f"speculative must be 'lookup' (prompt lookup) or a proposer with propose(tokens, k), "
                             f"got {speculative!r}")
        speculative = PromptLookup()
    is_model = isinstance(getattr(speculative, "config", None), ModelConfig)     # a draft transformer
    if not is_model and not hasattr(speculative, "propose"):
        raise ValueError(f"speculative must be 'lookup', a proposer with propose(tokens, k) (an NGramDraft, the "
                         f"MLP draft load_model('tiny-draft')[0]) or a smaller llmopt model with the same "
                         f"tokenizer, got {type(speculative).__name__}")
    vocab = getattr(getattr(speculative, "config", None), "vocab_size", None)
    if vocab is not None and vocab != model.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({vocab}) differs from the model's ({model.config.vocab_size}): "
                         "it must share the model's tokenizer")
    device = getattr(speculative, "device", None)
    if isinstance(device, torch.device) and device != model.device:
        raise ValueError(f"the draft is on {device}, the model on {model.device}: move both to one device")
    if overlap:
        raise ValueError("speculative decoding proposes each step's drafts from the tokens the last step "
                         "accepted, on the host, so steps cannot overlap: pass overlap=False")
    return speculative
