"""Static and dynamic batching (notebook 04).

Decoding one sequence reads every weight once per token; decoding B sequences
together reads them once for all B, so on a memory-bound device throughput
grows almost linearly with B until compute takes over.

- `generate_batch` is *static* batching: prompts of different lengths are left
  padded into one [B, T] tensor, every row gets its own rotary positions and a
  key mask that hides its padding, and the batch decodes until its longest row
  is done (finished rows idle: that is the waste continuous batching removes).
- `DynamicBatcher` groups queued requests into batches under a maximum batch
  size and a token budget, similar lengths together, and when a batch runs out
  of memory splits it in two and retries. Every request gets its own result.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future

import torch

from .config import check_count
from .cuda_graphs import BatchStepGraph
from .generate import (COMPILE_BUCKET, Generation, TextStream, _as_stop_list, _checked_request, _eos_ids,
                       _model_key, compiled_cache, compiled_decode, decode_one_token, kept_graph, per_prompt,
                       per_prompt_options, timing_stats)
from .kv_cache import kv_cache_bytes, make_cache, to_device
from .sampling import greedy, sample, seeded_generator


class MemoryBudgetExceeded(MemoryError):
    """A batch would need more memory than the enforced budget (the CPU stand-in for CUDA OOM)."""


def batch_memory_bytes(cfg, batch_size: int, prompt_len: int, total_len: int,
                       dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak bytes of one static batch beyond the weights.

    The KV cache for `total_len` positions per row, plus the prefill's largest
    activations (hidden states, q/k/v and the SwiGLU intermediates for every
    prompt token) and one row of logits per sequence.
    """
    elem = torch.finfo(dtype).bits // 8
    kv = kv_cache_bytes(cfg, batch_size, total_len, dtype)
    acts = batch_size * prompt_len * (4 * cfg.dim + 3 * cfg.intermediate_size) * elem
    return kv + acts + batch_size * cfg.vocab_size * 4


def batch_step_graph(model, cache, batch: int) -> BatchStepGraph:
    """The `BatchStepGraph` of `model` for this static cache and batch size: kept with the cache
    (`generate.kept_graph`, so each kept cache shape keeps its graph) and made anew, to be recorded
    again, when the batch size or any weight changes (a graph holds their addresses)."""
    weights = _model_key(model)
    return kept_graph(model, cache, "batch", lambda g: g.batch == batch and g.weights == weights,
                      lambda: BatchStepGraph(model, cache, batch, decode_one_token, weights))


def generate_batch(model, tokenizer, prompts, *, max_new_tokens=64, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, seed=None, stop=None,
                   cache: str = "static", ignore_eos: bool = False, compile: str | bool = False,
                   memory_budget: int | None = None, cuda_graphs: bool = False) -> list[Generation]:
    """Generate for several prompts at once (static batching): one `Generation` per prompt, in order.

    Takes the options of `generate`; `max_new_tokens` and `seed` may also be lists
    (one per prompt). Each row samples with its own generator seeded like an
    unbatched call, so greedy and seeded outputs equal `generate`'s per prompt.
    `memory_budget` (bytes) refuses a batch whose estimated cache and activations
    exceed it with `MemoryBudgetExceeded`, before anything is allocated.
    With `cuda_graphs` (static cache, no `compile`), the batch's decode step is recorded
    as one CUDA graph at its first step and replayed at every later one, with no
    compiler involved (`BatchStepGraph`); the cache, sized up to a multiple of 256 slots,
    is kept per model with its graph (the last `generate.KEPT_CACHES` shapes), so later
    batches of a size and length met before reuse both. On a CPU the same step runs eagerly.
    """
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    if cuda_graphs and (cache != "static" or compile):
        raise ValueError("cuda_graphs=True records the eager decode step over a static cache: use it with "
                         f"cache='static' and without compile (got cache={cache!r}, compile={compile!r}); "
                         "compile='reduce-overhead' records CUDA graphs through torch.compile instead")
    start = time.perf_counter()
    if isinstance(prompts, (str, torch.Tensor)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of prompts (text or token ids); "
                         "for one prompt use llmopt.generate")
    n = len(prompts)
    max_new = per_prompt(max_new_tokens, n, "max_new_tokens")
    seeds = per_prompt(seed, n, "seed")
    ids = [_checked_request(model, tokenizer, p, m, temperature, top_k, top_p, cache, compile, seed=s)
           for p, m, s in zip(prompts, max_new, seeds)]
    stop = _as_stop_list(stop)
    eos = _eos_ids(tokenizer, ignore_eos)
    watch = [TextStream(tokenizer, stop) for _ in range(n)]     # each row's text, for the stop strings
    device, cfg = model.device, model.config
    T = max(len(i) for i in ids)
    steps = max(max_new)
    max_len = T + steps
    if compile or cuda_graphs:
        max_len = min(cfg.max_seq_len, -(-max_len // COMPILE_BUCKET) * COMPILE_BUCKET)
    if max_len > cfg.max_seq_len:
        raise ValueError(f"longest prompt ({T} tokens, after padding) + max_new_tokens ({steps}) "
                         f"exceeds the model's context of {cfg.max_seq_len}: batch shorter "
                         "prompts together or ask for fewer tokens")
    if memory_budget is not None:
        need = batch_memory_bytes(cfg, n, T, max_len, model.dtype)
        if need > memory_budget:
            raise MemoryBudgetExceeded(f"a batch of {n} x ({T} + {steps}) tokens needs about "
                                       f"{need / 2**20:.1f} MiB, over the budget of "
                                       f"{memory_budget / 2**20:.1f} MiB: split the batch")
    gens = [seeded_generator(s, temperature, device) for s in seeds]

    pad = [T - len(i) for i in ids]
    pad_id = (eos and min(eos)) or 0
    tokens = torch.tensor([[pad_id] * p + i for p, i in zip(pad, ids)], device=device)  # [B, T]
    pad_t = torch.tensor(pad, device=device)[:, None]                                  # [B, 1]
    slots = torch.arange(max_len, device=device)
    key_mask = slots[None, :] >= pad_t                    # [B, max_len]: False on each row's padding
    positions = (slots[None, :T] - pad_t).clamp(min=0)    # [B, T]: every row's prompt starts at 0
    decode = compiled_decode(model, "default" if compile is True else compile) if compile \
        else decode_one_token

    new: list[list[int]] = [[] for _ in range(n)]
    times: list[list[float]] = [[] for _ in range(n)]
    reason = ["length"] * n
    texts: list[str | None] = [None] * n
    done = [False] * n
    with torch.inference_mode(), contextlib.ExitStack() as held:
        if cuda_graphs:       # the kept cache (and with it the kept graph), when no other call holds it
            kv, release = compiled_cache(model, n, max_len)
            held.callback(release)
            graph = batch_step_graph(model, kv, n)
            graph.start(pad_t, key_mask)
        else:
            kv = make_cache(cache, cfg, n, max_len, device=device, dtype=model.dtype)
        if kv is None:
            logits = model(tokens, positions=positions, key_mask=key_mask[:, :T], last_only=True)[:, -1]
        else:
            logits = model(tokens, torch.arange(T, device=device), kv, positions=positions,
                           key_mask=key_mask, last_only=True)[:, -1]
        for step in range(steps):
            if temperature == 0:
                next_tok = greedy(logits)                                        # [B]
            else:
                next_tok = torch.cat([sample(logits[r:r + 1], temperature, top_k, top_p, gens[r])
                                      for r in range(n)])
            toks = next_tok.tolist()                                             # one host sync
            now = time.perf_counter() - start
            for r, tok in enumerate(toks):
                if done[r]:
                    continue
                new[r].append(tok)
                times[r].append(now)
                if tok in eos:
                    reason[r], done[r] = "eos", True
                elif stop:
                    watch[r].push(tok)
                    if watch[r].stopped:
                        reason[r], texts[r], done[r] = "stop", watch[r].text, True
                if len(new[r]) >= max_new[r]:
                    done[r] = True
            if all(done):
                break
            # finished rows keep decoding a token nobody reads: static batching's idle slots
            p = T + step
            pos = (p - pad_t)                                                    # [B, 1]
            if kv is None:
                tokens = torch.cat([tokens, next_tok[:, None]], dim=1)
                positions = torch.cat([positions, pos], dim=1)
                logits = model(tokens, positions=positions, key_mask=key_mask[:, :p + 1],
                               last_only=True)[:, -1]
            elif cuda_graphs:
                logits = graph.run(next_tok, p)
            else:
                logits = decode(model, next_tok[:, None], to_device([p], device), kv,
                                positions=pos, key_mask=key_mask)
    out = []
    padded_tokens = n * T
    for r in range(n):
        text = texts[r] if texts[r] is not None else (tokenizer.decode(new[r]) if tokenizer else "")
        stats = timing_stats(times[r], len(ids[r]))
        stats.update(cache=cache, device=str(device), dtype=str(model.dtype).removeprefix("torch."),
                     compiled=bool(compile), cuda_graphs=cuda_graphs, batch_size=n,
                     padding_fraction=1 - sum(map(len, ids)) / padded_tokens)
        out.append(Generation(token_ids=new[r], text=text, prompt_ids=ids[r], finish_reason=reason[r],
                              stats=stats, token_times=times[r]))
    return out


class DynamicBatcher:
    """Queue requests; run them in batches bounded by size and tokens; split a batch on OOM.

    submit(prompt, **options) -> concurrent.futures.Future[Generation]. A worker
    thread waits up to `max_wait_s` for a batch to fill, then takes up to
    `max_batch_size` requests whose padded size (rows x (longest prompt + most
    new tokens)) fits `max_batch_tokens`; with `sort_by_length` it picks requests
    of similar length together, which cuts padding. Requests batch together only
    when their sampling options (temperature, top_k, top_p, stop, ignore_eos)
    match. When a batch raises CUDA out-of-memory, or exceeds `memory_budget`
    bytes, it is split in half and each half retried; a single request that still
    does not fit fails alone with a clear error. Any other fault in a batch reruns its
    requests one by one, so only the faulty request fails (its neighbours' tokens are
    computed again). Nothing is lost, and no request returns twice.
    `cache` and `cuda_graphs` are passed to `generate_batch`.
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_batch_tokens: int = 8192,
                 max_wait_s: float = 0.01, sort_by_length: bool = True,
                 memory_budget: int | None = None, cache: str = "static", cuda_graphs: bool = False) -> None:
        check_count(max_batch_size, "max_batch_size")
        check_count(max_batch_tokens, "max_batch_tokens")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s, self.sort_by_length = max_wait_s, sort_by_length
        if not isinstance(cuda_graphs, bool) or (cuda_graphs and cache != "static"):
            raise ValueError(f"cuda_graphs must be True or False, and True only with cache='static' "
                             f"(got cuda_graphs={cuda_graphs!r}, cache={cache!r})")
        self.memory_budget, self.cache, self.cuda_graphs = memory_budget, cache, cuda_graphs
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches: list[dict] = []        # log: size, outcome, padding (notebook 04)
        self._thread: threading.Thread | None = None   # started by the first submit

    # ---- client side -------------------------------------------------------------
    def _item(self, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
              top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
              stop=None, ignore_eos: bool = False) -> dict:
        """Validate one request (raising in the caller) and make its queue entry."""
        ids = _checked_request(self.model, self.tokenizer, prompt, max_new_tokens, temperature,
                               top_k, top_p, self.cache, seed=seed)
        if len(ids) + max_new_tokens > self.max_batch_tokens:
            raise ValueError(f"request of {len(ids)} + {max_new_tokens} tokens exceeds "
                             f"max_batch_tokens={self.max_batch_tokens}: raise the budget or shorten it")
        key = (temperature, top_k, top_p, tuple(_as_stop_list(stop)), ignore_eos)
        return dict(ids=ids, max_new_tokens=max_new_tokens, seed=seed, key=key, future=Future(),
                    submitted=time.perf_counter())

    def submit(self, prompt, **options) -> Future:
        """Queue one request (options as `llmopt.generate`); returns a Future of its `Generation`."""
        item = self._item(prompt, **options)
        with self._cv:
            if self._closed:
                raise RuntimeError("this DynamicBatcher is closed: create a new one to submit more")
            self._queue.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llmopt-dynamic-batcher",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()
        return item["future"]

    def run(self, prompts, **options) -> list[Generation]:
        """Offline mode: batch every prompt and return the results in the order of `prompts`.

        `max_new_tokens` and `seed` may be lists (one per prompt). With no worker
        thread started, batches run in the calling thread (faster on CPU, where
        PyTorch runs slower from a second Python thread).
        """
        items = [self._item(p, **o) for p, o in zip(prompts, per_prompt_options(len(prompts), options))]
        with self._cv:
            if self._closed:
                raise RuntimeError("this DynamicBatcher is closed: create a new one to submit more")
            background = self._thread is not None
            if background:
                self._queue.extend(items)
                self._cv.notify()
        if not background:
            pending = deque(items)
            while pending:
                self._run(self._take_batch(pending))
        return [it["future"].result() for it in items]

    def close(self, wait: bool = True) -> None:
        """Stop accepting requests; with `wait`, finish the queued ones first, else cancel them."""
        with self._cv:
            self._closed = True
            if not wait:
                while self._queue:
                    self._queue.popleft()["future"].cancel()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close(wait=True)

    # ---- worker ----------------------------------------------------------------------
    def _take_batch(self, queue: deque) -> list[dict]:
        """Pick the next batch from `queue` and remove it (called with the lock held)."""
        head = queue[0]
        same = [r for r in queue if r["key"] == head["key"]]
        if self.sort_by_length:   # the oldest request, then the closest lengths to it
            n = len(head["ids"])
            same = [head] + sorted(same[1:], key=lambda r: abs(len(r["ids"]) - n))
        batch: list[dict] = []
        for r in same:
            rows = batch + [r]
            size = len(rows) * (max(len(x["ids"]) for x in rows) + max(x["max_new_tokens"] for x in rows))
            if len(rows) > self.max_batch_size:
                break
            if batch and size > self.max_batch_tokens:
                if self.sort_by_length:
                    continue              # a shorter request may still fit
                break
            batch.append(r)
        for r in batch:
            queue.remove(r)
        return batch

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._closed:
                        self._cv.wait()
                    if not self._queue and self._closed:
                        return
                    # give the batch a moment to fill, unless it is already full
                    deadline = self._queue[0]["submitted"] + self.max_wait_s
                    while (len(self._queue) < self.max_batch_size and not self._closed
                           and time.perf_counter() < deadline):
                        self._cv.wait(timeout=max(0.0, deadline - time.perf_counter()))
                    batch = self._take_batch(self._queue)
                self._run(batch)
        except BaseException as e:   # a bug here must not leave callers waiting forever
            with self._cv:
                self._closed = True
                leftover = list(self._queue)
                self._queue.clear()
            for r in leftover:
                if not r["future"].done():
                    r["future"].set_exception(RuntimeError(f"the batcher stopped: {e!r}"))
            raise

    def _run(self, batch: list[dict], splits: int = 0) -> None:
        if not splits:   # drop requests cancelled while queued; the rest are now running
            batch = [r for r in batch if r["future"].set_running_or_notify_cancel()]
        if not batch:
            return
        temperature, top_k, top_p, stop, ignore_eos = batch[0]["key"]
        try:
            started = time.perf_counter()
            gens = generate_batch(self.model, self.tokenizer, [r["ids"] for r in batch],
                                  max_new_tokens=[r["max_new_tokens"] for r in batch],
                                  seed=[r["seed"] for r in batch], temperature=temperature,
                                  top_k=top_k, top_p=top_p, stop=list(stop), ignore_eos=ignore_eos,
                                  cache=self.cache, memory_budget=self.memory_budget,
                                  cuda_graphs=self.cuda_graphs)
        except (MemoryBudgetExceeded, torch.OutOfMemoryError) as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                batch[0]["future"].set_exception(MemoryError(
                    f"this request does not fit in memory even alone ({e}); shorten it, lower "
                    "max_new_tokens or free memory"))
                return
            self.batches.append(dict(size=len(batch), outcome="split"))
            half = len(batch) // 2
            self._run(batch[:half], splits + 1)
            self._run(batch[half:], splits + 1)
            return
        except Exception as e:
            if len(batch) == 1:           # a fault of this request's own: it fails alone
                batch[0]["future"].set_exception(e)
                return
            # one request's fault would fail the whole batch (one forward for all its rows): run each
            # request alone instead, so the faulty one fails and its neighbours complete
            self.batches.append(dict(size=len(batch), outcome=f"failed ({type(e).__name__}), rerun one by one"))
            for r in batch:
                self._run([r], splits + 1)
            return
        self.batches.append(dict(size=len(batch), outcome="ok", splits=splits,
                                 steps=max(len(g.token_ids) for g in gens),
                                 padding_fraction=gens[0].stats["padding_fraction"]))
        for r, g in zip(batch, gens):
            queue_s = started - r["submitted"]
            shift = started - r["submitted"]       # times from submission, like the engine's
            g.token_times = [t + shift for t in g.token_times]
            g.stats.update(timing_stats(g.token_times, len(r["ids"])), queue_s=queue_s,
                           batch_size=len(batch))
            r["future"].set_result(g)


def sweep_batch_size(model, tokenizer, prompt, sizes=(1, 2, 4, 8, 16), *, new_tokens: int = 64,
                     repeats: int = 3) -> list[dict]:
    """Decode throughput and per-token latency against batch size (notebook 04).

    Every row of a batch gets the same prompt, so no padding is involved: this is
    the pure effect of reading the weights once for B tokens. Sizes are measured
    interleaved; medians of `repeats`.
    """
    from .profiling import measure_generations
    runs = {f"batch {b}": (lambda b=b: _batch_as_generation(model, tokenizer, [prompt] * b, new_tokens))
            for b in sizes}
    rows = measure_generations(runs, warmup=1, repeats=repeats)
    for b, row in zip(sizes, rows):
        row["batch_size"] = b
        row["tokens_per_s"] = b * row["decode_tokens_per_s"]     # all rows together
    return rows


def _batch_as_generation(model, tokenizer, prompts, new_tokens: int) -> Generation:
    """One static batch, reported as its first row's Generation (all rows share its timings)."""
    return generate_batch(model, tokenizer, prompts, max_new_tokens=new_tokens, ignore_eos=True)[0]
