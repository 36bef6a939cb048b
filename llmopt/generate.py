"""Generation: prefill, one-token decode, and the loop around them (notebook 00).

The path of a request:
    text -> tokenizer -> ids -> prefill (one forward over the prompt, fills the
    cache) -> decode steps (one token per forward, reading the cache) -> sampler -> text

`prefill` and `decode_one_token` are separate functions so each can be timed or
compiled alone. `generate` returns a `Generation`; `stream` yields text pieces.
"""
from __future__ import annotations

import operator
import threading
import time
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import check_count
from .cuda_graphs import GraphRecordingError, record_cuda_graph
from .kernels import dependent_launch
from .kv_cache import CACHE_KINDS, make_cache, to_device
from .model import check_llmopt_model
from .sampling import check_penalties, check_sampling, check_seed, greedy, sample, seeded_generator
from .tokenizer import IncrementalDecoder


@dataclass
class Generation:
    """The result of one request: new token ids, their text, and timings."""
    token_ids: list[int]
    text: str
    prompt_ids: list[int]
    finish_reason: str                      # "length", "eos" or "stop"
    stats: dict = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list, repr=False)  # arrival of each token, s
    # the engine's logprobs and prompt_logprobs options (Engine.submit): the model's log-probability of
    # each new token and, per token, its most likely alternatives as (id, log-probability); the prompt's
    # the same, None for its first token. None when not asked for
    logprobs: list[float] | None = field(default=None, repr=False)
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None, repr=False)
    prompt_logprobs: list[float | None] | None = field(default=None, repr=False)
    prompt_top_logprobs: list | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"Generation({len(self.token_ids)} tokens, finish={self.finish_reason!r}, "
                f"text={self.text[:60]!r}{'...' if len(self.text) > 60 else ''})")


def prefill(model, input_ids: torch.Tensor, cache, **kw) -> torch.Tensor:
    """One forward over the prompt [B, T]; fills `cache`; returns last-position logits [B, V]."""
    T = input_ids.shape[1]
    input_pos = torch.arange(T, device=input_ids.device)
    return model(input_ids, input_pos, cache, last_only=True, **kw)[:, -1]


def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor, cache, **kw) -> torch.Tensor:
    """One forward for one new token per row: token [B, 1] at cache slot input_pos [1] -> logits [B, V]."""
    return model(token, input_pos, cache, **kw)[:, -1]


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {mode: compiled step}
COMPILE_BUCKET = 256  # compiled caches are sized in multiples of this, so lengths share one graph
MIN_SESSION_CACHE = 256  # slots a Session's cache starts with; it doubles as the conversation grows


def compiled_decode(model, mode: str = "default"):
    """`decode_one_token` compiled with `torch.compile` for this model (notebook 08).

    Compiled once per model and mode, reused by every `generate(..., compile=...)`.
    Only the fixed-shape decode step is compiled; prefill stays eager (compiling it
    for every prompt length is very slow). mode="reduce-overhead" adds CUDA graphs on GPU;
    "max-autotune" on a CPU also freezes the weights into the graph (`_frozen_decode`).
    """
    if mode == "max-autotune" and model.device.type == "cpu":
        return _frozen_decode(model)
    return _compiled_once(model, mode, decode_one_token, None if mode == "default" else mode)


def _compiled_once(model, key, fn, mode: str | None):
    """`fn` through torch.compile (fixed shapes, one graph), made once per model and `key`."""
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        per_model[key] = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    return per_model[key]


def _own_decode_step(model):
    """`decode_one_token` bound to `model`, as a function with its own code object.

    Dynamo keeps compiled graphs per code object and, with the module guards skipped, would
    hand one build's frozen weights to the next (another model, or changed weights); a fresh
    code object per build keeps them apart. The model is a closure variable, so Inductor's
    freezing sees its weights as constants.
    """
    def step(token, input_pos, cache, **kw):
        return decode_one_token(model, token, input_pos, cache, **kw)
    return types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, None,
                              step.__closure__)


def _model_key(model) -> tuple:
    """Changes when any weight is replaced or modified in place (tensor identity, version), or
    when the model's or a layer's class or a layer's attention backend changes (`fold_layers`,
    `set_attention`): a recorded graph or a frozen step holds both, and replaying an old one would
    run the old kernels."""
    weights = tuple((id(t), t.data_ptr(), _version(t)) for t in (*model.parameters(), *model.buffers()))
    return weights, type(model), tuple((type(m), getattr(getattr(m, "self_attn", None), "backend", None))
                                       for m in getattr(model, "layers", ()))


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # made under inference_mode: no version counter, identity still counts
        return None


def _frozen_decode(model):
    """CPU `compile="max-autotune"`: the decode step with its weights frozen into the graph.

    Freezing makes the weights constants, so Inductor can pre-pack them and, with
    max_autotune, time its C++ GEMM templates (AMX / AVX-512 micro-kernels, ones for
    weight-only int8 and int4) against ATen's kernels for every matmul shape and keep the
    fastest; quantized layers see `quantize.frozen_weights()` and trace the packed ops.
    Guards on the model's modules are skipped (their check cost ~0.3 ms a step on the 2-core
    Xeon); freezing and skipped guards both need the weights (and the attention backend) not to
    change, so the step is rebuilt whenever they do (`_model_key`), from its own code object
    (`_own_decode_step`); it lives on the model, not in `_COMPILED`, so it is freed with the model. The graph's
    kernels are called from generated C++ (`cpp_wrapper`) rather than Python: 7-8% off a
    bf16 + int4 llama-100m step there (3.70 vs 4.01 ms, medians of 8 interleaved). Notebook
    06 measures it.
    """
    key = _model_key(model)
    entry = model.__dict__.get("_llmopt_frozen_decode")
    if entry is None or entry[0] != key:
        import torch._inductor.config as inductor_config
        from .quantize import frozen_weights
        step = torch.compile(_own_decode_step(model), fullgraph=True, dynamic=False,
                             options={"max_autotune": True, "cpp_wrapper": True,
                                      "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

        def run(_model, token, input_pos, cache, **kw):
            # compilation happens inside the first call (and any recompile), so the
            # freezing switch must be on around every call; the autotune tables stay quiet
            with inductor_config.patch(freezing=True, autotune_num_choices_displayed=0), \
                    frozen_weights(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
                return step(token, input_pos, cache, **kw)

        entry = (key, run)
        model.__dict__["_llmopt_frozen_decode"] = entry
    return entry[1]


def greedy_step(model, token: torch.Tensor, input_pos: torch.Tensor, cache) -> torch.Tensor:
    """One greedy decode step that feeds itself: returns the next token [B] and writes it into
    `token` [B, 1], and moves `input_pos` [1] on by one, in place.

    The same tensors are then the next step's inputs, so k calls in a row need nothing from
    the host in between: that is what lets `DecodeGraph` record them as one CUDA graph.
    """
    nxt = greedy(decode_one_token(model, token, input_pos, cache))
    token.copy_(nxt[:, None])
    input_pos.add_(1)
    return nxt


# torch.compile mode of the step inside llmopt's own CUDA graph: torch's CUDA graphs
# (reduce-overhead) cannot be recorded inside another graph, so that mode drops them
GRAPH_STEP_MODES = {True: None, "default": None, "reduce-overhead": None,
                    "max-autotune": "max-autotune-no-cudagraphs"}


def graph_step(model, compile: str | bool = False):
    """The step `DecodeGraph` records: `greedy_step`, compiled when `compile` (kept per model and mode)."""
    if not compile:
        return greedy_step
    mode = GRAPH_STEP_MODES[compile]
    return _compiled_once(model, ("greedy_step", mode), greedy_step, mode)


class DecodeGraph:
    """`k` greedy decode steps recorded as one CUDA graph and replayed by llmopt (notebook 08).

    `compile="reduce-overhead"` already replays each step as a CUDA graph, but the host
    still runs every step: the Python loop, Dynamo's guard checks, the graph tree's
    bookkeeping and a separate launch per step. On an H100 (2026-11-27) a 1B-shape token
    took 1.69 ms while its step's graph, profiled on the same card, kept the GPU busy for
    1.49 ms: the rest was the GPU waiting for the host. Here the host launches one graph per
    k tokens and reads the k tokens back once: `greedy_step` feeds each step's token
    and position to the next on the device, so nothing in between needs the host.

    The first `run` does its k steps outside the graph (a side stream: compiling, autotuning
    and library handles happen there; the tokens are real) and then records them; later
    runs replay. The graph holds raw addresses of the weights, the cache and its own
    buffers, so it is kept per model only while those stay the same (`decode_graph`).
    On a CPU there is nothing to record: `run` takes the same k steps one by one.
    It is kept beside the model (`_COMPILED`, never inside it, so `copy.deepcopy(model)`
    does not try to copy a recorded graph) and holds the model weakly.
    """

    def __init__(self, model, cache, k: int, step, weights: tuple) -> None:
        self._model = weakref.ref(model)
        self.cache, self.k, self.step = cache, k, step
        device = model.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)   # the next step's input
        self.pos = torch.zeros(1, dtype=torch.long, device=device)        # its cache slot
        self.out = torch.zeros(k, dtype=torch.long, device=device)        # the k tokens of a run
        self.graph = None
        self.weights = weights                      # `_model_key(model)` and the launch mode when recorded

    @property
    def model(self):
        return self._model()

    def start(self, token: torch.Tensor, pos: int) -> None:
        """Continue after `token` (a device tensor of one id), whose cache slot is `pos`."""
        self.token.copy_(token.view(1, 1))
        self.pos.fill_(pos)

    def steps(self, n: int) -> torch.Tensor:
        """The next n tokens [n], step by step without the graph (also the graph's recording)."""
        return torch.cat([self.step(self.model, self.token, self.pos, self.cache) for _ in range(n)])

    def run(self) -> torch.Tensor:
        """The next k tokens [k] on the device; the inputs move on by k."""
        if self.model.device.type != "cuda":
            return self.steps(self.k)
        if self.graph is None:
            try:
                _, self.graph = record_cuda_graph(lambda: self.out.copy_(self.steps(self.k)))
            except GraphRecordingError as e:
                raise RuntimeError(f"recording {self.k} decode steps as one CUDA graph failed ({e}); generate "
                                   f"with graph_steps=1 instead (sync_every={self.k} also reads tokens back "
                                   f"once per {self.k} steps)") from e.__cause__
        else:
            self.graph.replay()
        return self.out


def decode_graph(model, cache, k: int, compile: str | bool = False) -> DecodeGraph:
    """The `DecodeGraph` of `model` for this cache, k and step; kept with the cache (`kept_graph`)
    and rebuilt (and recorded again) when k, the step, any weight, or how llmopt's kernels launch
    (`kernels.set_dependent_launch`) changes."""
    step = graph_step(model, compile)
    weights = (_model_key(model), dependent_launch(model.device))
    return kept_graph(model, cache, "decode", lambda g: g.k == k and g.step is step and g.weights == weights,
                      lambda: DecodeGraph(model, cache, k, step, weights))


# static cache shapes kept per model for compiled and graph decoding, each with its graphs: at most
# KEPT_CACHES, and older ones only while all of them take at most KEPT_CACHE_BYTES
KEPT_CACHES, KEPT_CACHE_BYTES = 4, 2**30


class KeptCache:
    """A static cache kept per model (`compiled_cache`), the lock its one user holds, and the graphs
    recorded over it (name -> graph): a graph holds the cache's addresses, so it lives and goes with it."""

    def __init__(self, cache) -> None:
        self.cache, self.lock, self.graphs = cache, threading.Lock(), {}


def compiled_cache(model, batch_size: int, max_len: int):
    """(cache, release) for a compiled decode: a static cache kept per model and reused.

    CUDA graphs replay on fixed addresses, so the compiled step should write into the
    same buffers every generation (buffers at new addresses make the graph re-record).
    The last `KEPT_CACHES` shapes (batch size, length, dtype, device) are kept per model while
    together they take at most `KEPT_CACHE_BYTES` (the newest is always kept), the least
    recently used dropped first (with its graphs), so generations that alternate between a few
    shapes (static batches of 256 and 512 slots, say) replay theirs rather than record again.
    Stale entries from an earlier generation never leak: attention masks every slot after the
    current position. A second generation that runs while the kept cache is in use (another
    thread) gets a fresh cache instead.
    """
    kept = _COMPILED.setdefault(model, {}).setdefault("caches", OrderedDict())
    key = (batch_size, max_len, model.dtype, str(model.device))
    entry = kept.get(key)
    if entry is None:
        entry = kept[key] = KeptCache(make_cache("static", model.config, batch_size, max_len,
                                                 device=model.device, dtype=model.dtype))
    kept.move_to_end(key)
    while len(kept) > KEPT_CACHES or (len(kept) > 1 and
                                      sum(e.cache.nbytes for e in kept.values()) > KEPT_CACHE_BYTES):
        kept.popitem(last=False)          # the least recently used shape, and its graphs
    if entry.lock.acquire(blocking=False):
        return entry.cache, entry.lock.release
    return make_cache("static", model.config, batch_size, max_len, device=model.device,
                      dtype=model.dtype), lambda: None


def kept_graph(model, cache, name: str, fits, make):
    """The graph `name` recorded over `cache` when `cache` is one the model keeps (`compiled_cache`)
    and `fits(graph)`; else `make()`, kept with the cache for the next call (a cache the model does
    not keep gets a graph that is not kept either)."""
    entry = next((e for e in _COMPILED.get(model, {}).get("caches", {}).values() if e.cache is cache), None)
    graph = entry.graphs.get(name) if entry is not None else None
    if graph is None or not fits(graph):
        graph = make()
        if entry is not None:
            entry.graphs[name] = graph
    return graph


def kept_graphs(model, name: str) -> list:
    """The graphs `name` kept with the model's caches, the most recently used cache's last."""
    return [e.graphs[name] for e in _COMPILED.get(model, {}).get("caches", {}).values() if name in e.graphs]


def _token_id(i) -> int:
    """An integer token id (Python, NumPy or a 0-d integer tensor); TypeError for anything else."""
    if isinstance(i, bool):
        raise TypeError("a bool is not a token id")
    return operator.index(i)


def encode_prompt(model, tokenizer, prompt, max_new_tokens: int) -> list[int]:
    """Prompt text or ids -> ids, checked against the vocabulary and the context length."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty: give at least one character of text (or token ids)")
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass one, or give token ids")
        ids = tokenizer.encode(prompt)
    else:
        try:          # integers only: int() would quietly turn 1.5 into token 1
            if isinstance(prompt, torch.Tensor):
                if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
                    raise TypeError
                ids = prompt.flatten().tolist()
            else:
                ids = [_token_id(i) for i in prompt]
        except (TypeError, ValueError):
            raise ValueError(f"prompt must be text, or token ids (integers) in a list or tensor, got "
                             f"{prompt!r:.60}") from None
    if not ids:
        raise ValueError("prompt is empty: give at least one token")
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    check_count(max_new_tokens, "max_new_tokens")
    limit = model.config.max_seq_len
    if len(ids) >= limit:
        raise ValueError(f"prompt is too long: {len(ids)} tokens, and the model's context is {limit} "
                         f"tokens (prompt and new tokens together): keep at most the last {limit - 1} "
                         "tokens of the prompt (or fewer, to leave room for more new tokens)")
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's context of {limit} tokens: shorten the prompt or ask for "
                         f"at most {limit - len(ids)} new tokens")
    return ids


def _eos_ids(tokenizer, ignore_eos: bool) -> set[int]:
    """The token ids that end a generation (none when `ignore_eos`)."""
    return set() if ignore_eos else set(getattr(tokenizer, "eos_token_ids", None) or [])


@torch.inference_mode()    # around each step of the generator only: not over the caller's loop body
def _token_stream(model, tokenizer, ids: list[int], start: float, *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, cache: str = "static", ignore_eos: bool = False,
                  compile: str | bool = False, sync_every: int = 1, graph_steps: int = 1):
    """Yields (token_id, seconds since `start`) for each new token; the loop of generate/stream.

    With `sync_every` = k > 1 the next token stays on the device and feeds the next step
    directly: the host reads tokens (one sync) only every k steps, so on an asynchronous
    device (a GPU) it queues k steps ahead instead of waiting for each one. The first
    token is always read at once (TTFT). A chunk that passes end-of-sequence has computed a
    few tokens nobody reads; the tokens yielded are the same as with k = 1. With
    `graph_steps` = k > 1 (greedy) the k steps after the first token run as one CUDA
    graph (`DecodeGraph`), read back once. In fp16, where activations can overflow (notebook
    05), each token's logits are checked on the device and the flag read back with the token:
    NaN or inf raises a FloatingPointError that says so, where greedy decoding would go on
    with garbage (the sampler only sees finite stand-ins: on a GPU it would assert).
    """
    device = model.device
    decode = decode_one_token
    max_len = len(ids) + max_new_tokens + graph_steps - 1   # a graph's last run may pass the end
    if compile and graph_steps == 1:
        decode = compiled_decode(model, "default" if compile is True else compile)
    if compile or graph_steps > 1:
        # one graph serves every length in a bucket: fixed cache shape
        max_len = min(model.config.max_seq_len, -(-max_len // COMPILE_BUCKET) * COMPILE_BUCKET)
    gen = seeded_generator(seed, temperature, device)
    eos = _eos_ids(tokenizer, ignore_eos)
    release = None
    tokens = torch.tensor([ids], device=device)                     # [1, T]
    if compile or graph_steps > 1:
        kv, release = compiled_cache(model, 1, max_len)
    else:
        kv = make_cache(cache, model.config, 1, max_len, device=device, dtype=model.dtype)
    try:
        if kv is None:
            logits = model(tokens, last_only=True)[:, -1]
        else:
            logits = prefill(model, tokens, kv)
        if graph_steps > 1:
            yield from _graph_tokens(model, kv, logits, len(ids), max_len, start,
                                     max_new_tokens=max_new_tokens, k=graph_steps, compile=compile, eos=eos)
            return
        # the next token's position, counted on the device: building it from a host int
        # every step would make the host wait for the device each step (`to_device`)
        pos = torch.tensor([len(ids)], device=device)
        pending: list[torch.Tensor] = []                               # sampled, not yet read
        check = model.dtype == torch.float16                           # where activations overflow
        for i in range(max_new_tokens):
            if check:                                                  # read back with the token: [token, ok]
                finite = logits.sum(-1, dtype=torch.float32).isfinite()
                logits = torch.nan_to_num(logits)
            next_tok = sample(logits, temperature, top_k, top_p, gen)      # [1]
            pending.append(torch.stack([next_tok, finite.long()], 1) if check else next_tok)
            last = i == max_new_tokens - 1
            if i == 0 or last or len(pending) == sync_every:               # every step when k = 1
                toks = (pending[0] if len(pending) == 1 else torch.cat(pending)).tolist()   # host sync
                pending = []
                now = time.perf_counter() - start
                for j, tok in enumerate(toks):
                    if check:
                        tok, ok = tok
                        if not ok:
                            raise not_finite_error(i + 2 - len(toks) + j)
                    yield tok, now
                    if tok in eos:
                        return
            if last:
                return
            if kv is None:  # no cache: recompute the whole sequence
                tokens = torch.cat([tokens, next_tok[:, None]], dim=1)
                logits = model(tokens, last_only=True)[:, -1]
            else:
                logits = decode(model, next_tok[:, None], pos, kv)
                pos = pos + 1
    finally:
        if release is not None:
            release()


def not_finite_error(token: int, request: int | None = None) -> FloatingPointError:
    """What a generation loop raises when the logits of its new token number `token` are NaN or inf."""
    who = "" if request is None else f"request {request}: "
    return FloatingPointError(f"{who}the model's logits were not finite (NaN or inf) at new token {token}; in fp16 "
                              "activations can overflow (notebook 05): load the model in bf16 or fp32")


def _graph_tokens(model, kv, logits, pos: int, max_len: int, start: float, *, max_new_tokens: int,
                  k: int, compile, eos: set[int]):
    """`_token_stream`'s loop with `graph_steps=k`: the first token from the prefill's logits
    (read at once, TTFT), then k greedy tokens per `DecodeGraph` run, each run read back once.
    Steps go one at a time where a whole run no longer fits the cache, and on a CPU (no graph)
    for the last tokens; a GPU's last run may compute up to k - 1 tokens past the end, unread."""
    first = greedy(logits)
    tok, made = first.item(), 1
    yield tok, time.perf_counter() - start
    if tok in eos or made == max_new_tokens:
        return
    chunks = decode_graph(model, kv, k, compile)
    chunks.start(first, pos)                      # the first new token sits at slot len(prompt)
    pos += 1
    while made < max_new_tokens:
        whole = pos + k <= max_len and (model.device.type == "cuda" or made + k <= max_new_tokens)
        run = k if whole else min(k, max_len - pos, max_new_tokens - made)
        toks = (chunks.run() if whole else chunks.steps(run)).tolist()   # one host sync per run
        pos += run
        now = time.perf_counter() - start
        for tok in toks[:max_new_tokens - made]:
            made += 1
            yield tok, now
            if tok in eos:
                return


def _checked_request(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p,
                     cache, compile=False, sync_every=1, graph_steps=1, *, seed=None) -> list[int]:
    """Validate every option before any work starts; returns the prompt's ids."""
    check_llmopt_model(model, "llmopt's generation")
    check_sampling(temperature, top_k, top_p)
    check_seed(seed)
    check_count(sync_every, "sync_every (tokens read per host sync)")
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
    if compile not in (False, True, "default", "reduce-overhead", "max-autotune"):
        raise ValueError("compile must be False, True, 'default', 'reduce-overhead' or "
                         f"'max-autotune', got {compile!r}")
    if compile and cache != "static":
        raise ValueError(f"compile needs cache='static' (fixed shapes), got cache={cache!r}")
    check_count(graph_steps, "graph_steps (decode steps per CUDA graph)")
    if graph_steps > 1:
        if temperature != 0:
            raise ValueError("graph_steps records greedy decoding (temperature=0) in the graph: for sampling, "
                             "use sync_every=k instead, which also reads tokens back every k steps")
        if cache != "static":
            raise ValueError(f"graph_steps needs cache='static' (fixed addresses), got cache={cache!r}")
        if sync_every != 1:
            raise ValueError("graph_steps already reads tokens back once per graph of k steps: leave "
                             f"sync_every at 1 (got {sync_every!r})")
    return encode_prompt(model, tokenizer, prompt, max_new_tokens)


# the penalties' values that ask for none: generate stays on its own path, the engine skips the row's penalties
NO_PENALTIES = dict(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
ENGINE_OPTIONS = ("n", "logprobs", "prompt_logprobs", *NO_PENALTIES, "logit_bias")   # generate runs these on the engine
PER_PROMPT_OPTIONS = ("max_new_tokens", "seed")   # options that may be given one per prompt


def per_prompt(value, n: int, name: str) -> list:
    """`value` for each of `n` prompts: a list of n values, or one value repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts: give one per prompt "
                             "or a single value for all")
        return list(value)
    return [value] * n


def per_prompt_options(n: int, options: dict) -> list[dict]:
    """The options of each of `n` prompts, where `max_new_tokens` and `seed` may be lists."""
    rows = [dict(options) for _ in range(n)]
    for key in PER_PROMPT_OPTIONS:
        if key in options:
            for row, value in zip(rows, per_prompt(options[key], n, key)):
                row[key] = value
    return rows


def timing_stats(times: list[float], prompt_tokens: int) -> dict:
    """TTFT, TPOT (excluding the first token), decode tokens/s and end-to-end from arrival times."""
    n = len(times)
    ttft = times[0] if n else float("nan")
    e2e = times[-1] if n else float("nan")
    decode = e2e - ttft
    tpot = decode / (n - 1) if n > 1 else float("nan")
    return {"prompt_tokens": prompt_tokens, "new_tokens": n, "ttft_s": ttft, "tpot_s": tpot,
            "decode_tokens_per_s": (n - 1) / decode if n > 1 and decode > 0 else float("nan"),
            "e2e_s": e2e, "e2e_tokens_per_s": n / e2e if n and e2e > 0 else float("nan")}


def _stop_at(text: str, stop) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _as_stop_list(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return list(stop)


def generate(model, tokenizer, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop=None, cache: str = "static", ignore_eos: bool = False,
             compile: str | bool = False, n: int = 1, sync_every: int = 1,
             graph_steps: int = 1, logprobs: int | None = None, prompt_logprobs: bool = False,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             repetition_penalty: float = 1.0,
             logit_bias: dict[int, float] | None = None) -> Generation | list[Generation]:
    """Generate up to `max_new_tokens` after `prompt` (text or ids); greedy at temperature 0 (notebook 00).

    Stops at the tokenizer's end-of-sequence token (unless `ignore_eos`) or when the
    text contains one of the `stop` strings (the text is cut before it). `compile`
    runs the decode step through `torch.compile` (notebook 08). `sync_every=k` reads
    the sampled tokens back to the host once every k steps instead of every step, so a
    GPU is fed k steps ahead (same tokens; tokens of a chunk share one arrival time).
    `graph_steps=k` (greedy) goes further: llmopt records k decode steps as one CUDA graph
    and launches that, one launch and one read per k tokens (`DecodeGraph`; with
    `compile`, the step inside is compiled without torch's own CUDA graphs; on a CPU the
    same k steps run one by one, same tokens).

    `n > 1` returns a list of n samples of the same prompt (sample i seeded with
    seed + i), decoded together by the continuous-batching engine: the prompt is
    prefilled once and its KV blocks shared, copied on write (`Engine.sample_n`,
    notebook 13). `logprobs=k` adds the model's log-probability of each new token and of
    its k most likely alternatives, `prompt_logprobs=True` those of the prompt's tokens
    (`Generation.logprobs`, ...: see `Engine.submit`); both run on the engine too, as do
    `presence_penalty`, `frequency_penalty`, `repetition_penalty` and `logit_bias` (see
    `Engine.submit`).
    """
    check_penalties(presence_penalty, frequency_penalty, repetition_penalty)
    adjust = {k: v for k, v in dict(presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                    repetition_penalty=repetition_penalty).items() if v != NO_PENALTIES[k]}
    if logit_bias is not None:
        adjust["logit_bias"] = logit_bias         # (checked by the engine)
    if n != 1 or logprobs is not None or prompt_logprobs or adjust:
        what = ("n > 1 runs" if n != 1 else "penalties and logit_bias run" if adjust
                else "logprobs and prompt_logprobs run")
        check_count(n, "n (samples per prompt)")
        if compile or sync_every != 1 or graph_steps != 1:
            raise ValueError(f"{what} on the engine's paged cache: compile, sync_every and graph_steps "
                             "are not supported there")
        from .engine import Engine
        engine = Engine(model, tokenizer, max_batch_size=n)
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop=stop, ignore_eos=ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                       **adjust)
        if n == 1:
            return engine.generate_many([prompt], seed=seed, **options)[0]
        return engine.sample_n(prompt, n, seed=seed, **options)
    start = time.perf_counter()
    ids = _checked_request(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, cache,
                           compile, sync_every, graph_steps, seed=seed)
    stop = _as_stop_list(stop)
    eos = _eos_ids(tokenizer, ignore_eos)
    watch = TextStream(tokenizer, stop) if stop else None      # the text so far, for the stop strings
    new, times, reason, text = [], [], "length", None
    for tok, t in _token_stream(model, tokenizer, ids, start, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                cache=cache, ignore_eos=ignore_eos, compile=compile,
                                sync_every=sync_every, graph_steps=graph_steps):
        new.append(tok)
        times.append(t)
        if tok in eos:
            reason = "eos"
            break
        if watch is not None:
            watch.push(tok)
            if watch.stopped:
                reason, text = "stop", watch.text
                break
    if text is None:
        text = tokenizer.decode(new) if tokenizer is not None else ""  # ids in, ids out
    stats = timing_stats(times, len(ids))
    stats.update(cache=cache, device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
                 compiled=bool(compile), graph_steps=graph_steps)
    return Generation(token_ids=new, text=text, prompt_ids=ids, finish_reason=reason, stats=stats,
                      token_times=times)


def stream(model, tokenizer, prompt, **options) -> Iterator[str]:
    """Like `generate`, but yields the text of each new token as soon as it is sampled.

    A bad request raises here, at the call, not at the first token."""
    start = time.perf_counter()
    engine_only = [name for name in ENGINE_OPTIONS if name in options]
    if engine_only:
        raise ValueError(f"stream does not take {', '.join(engine_only)}: they run on the engine; stream with "
                         "llmopt.Engine(model, tok).submit(prompt, ...).pieces() (or call generate)")
    options.setdefault("max_new_tokens", 64)
    ids = _checked_request(model, tokenizer, prompt, options["max_new_tokens"],
                           options.get("temperature", 0.0), options.get("top_k"),
                           options.get("top_p"), options.get("cache", "static"),
                           options.get("compile", False), options.get("sync_every", 1),
                           options.get("graph_steps", 1), seed=options.get("seed"))
    text = TextStream(tokenizer, _as_stop_list(options.pop("stop", None)))
    return _text_pieces(model, tokenizer, ids, start, text, options)


def _text_pieces(model, tokenizer, ids, start, text, options) -> Iterator[str]:
    eos = _eos_ids(tokenizer, options.get("ignore_eos", False))
    for tok, _ in _token_stream(model, tokenizer, ids, start, **options):
        if tok in eos:
            break
        piece = text.push(tok)
        if piece:
            yield piece
        if text.stopped:
            return
    if text.flush():
        yield text.flush_piece


class TextStream:
    """Token ids in, text pieces out, safe to show as they come, cut before a stop string (`stream`, the
    engine's handles; and the stop-string check of every generation loop).

    Text comes from an `IncrementalDecoder` (a character split across tokens waits), and a
    tail that could be the start of a stop string is held back until it is not. Only the
    new text and the stop strings' length before it are searched, so a token costs the same
    at any length. `text`: all of it, cut before the stop string once one is found.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stop = [s for s in stop if s]
        self._reach = max(map(len, self.stop), default=1) - 1   # characters a stop string reaches back
        self._tail = ""                   # the last _reach characters released
        self._length = 0                  # characters released
        self._emitted = 0                 # characters handed out
        self._end: int | None = None      # where the text is cut (at a stop string)
        self.stopped = False
        self.flush_piece = ""

    @property
    def text(self) -> str:
        text = self.decoder.text if self.decoder is not None else ""
        return text[:self._end] if self.stopped else text

    def push(self, tok: int) -> str:
        """Add one token id; return the text now safe to show ("" if none)."""
        new = self.decoder.push(tok) if self.decoder is not None and not self.stopped else ""
        return self._release(new) if new else ""

    def flush(self) -> bool:
        """At the end: release whatever was held back. True if there was something."""
        rest = self.decoder.rest() if self.decoder is not None and not self.stopped else ""
        self.flush_piece = self._release(rest, final=True)
        return bool(self.flush_piece)

    def _release(self, new: str, final: bool = False) -> str:
        region, offset = self._tail + new, self._length - len(self._tail)    # region = text[offset:]
        self._length += len(new)
        safe = self._end if self.stopped else self._length
        if self.stop and not self.stopped:
            cut = _stop_at(region, self.stop)
            if cut is not None:
                self.stopped, self._end = True, offset + cut
                safe = self._end
            elif not final:   # the longest tail that begins a stop string waits
                for s in self.stop:
                    for k in range(min(len(s) - 1, len(region)), 0, -1):
                        if region.endswith(s[:k]):
                            safe = min(safe, self._length - k)
                            break
        self._tail = region[-self._reach:] if self._reach else ""
        if safe <= self._emitted:
            return ""
        piece = region[self._emitted - offset:safe - offset]
        self._emitted = safe
        return piece


def _finished(tokens) -> Generation:
    """Run a generator of tokens to its end; its return value."""
    while True:
        try:
            next(tokens)
        except StopIteration as done:
            return done.value


class Session:
    """A conversation that keeps its KV cache between calls (notebook 01, "tokens per call").

    Calling `generate` again with the growing text re-encodes and re-prefills
    everything each time. A Session instead remembers what the cache holds: each
    `session.generate(more_text, max_new_tokens=...)` prefills only the new text
    (and the last sampled token), then decodes. Greedy output over several calls
    equals one call producing the same number of tokens.

    The conversation may grow to `max_len` tokens (default: the model's context). Its static
    cache is sized to the conversation, not to `max_len`: attention reads every slot of a
    static cache, and Llama 3.2's context of 131,072 tokens would cost 4 GB (1B, bf16) and a
    131,072-key attention every step. It starts at `MIN_SESSION_CACHE` slots (or what the first
    call needs) and doubles, the cached keys and values copied over, when a call needs more.

    With an instruct checkpoint, `session.chat(message)` is a chat turn: the messages so far are
    laid out by the tokenizer's chat template, and only what the cache does not already hold is
    prefilled.
    """

    def __init__(self, model, tokenizer, prompt="", *, max_len: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        check_count(max_len, "max_len", optional=True)
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.cache = None               # a StaticKVCache, made and grown by _reserve
        self.ids: list[int] = []        # every token of the conversation so far
        self.cached = 0                 # how many of them the cache holds
        self.calls = 0
        self.messages: list[dict] = []  # chat(): the conversation as messages
        self.last: Generation | None = None   # the last stream's result, once it ended
        self._eos: set[int] = set()
        self._pending = list(encode_prompt(model, tokenizer, prompt, 1)) if prompt else []

    def chat(self, message: str, *, system: str | None = None, max_new_tokens: int = 256,
             **sampling) -> Generation:
        """One chat turn: `message` from the user (after a `system` message, on the first turn), the reply
        generated and kept among the messages (README, "Using the library").

        The tokenizer's chat template lays out all the messages again (`Tokenizer.apply_chat_template`),
        and the cache keeps the longest prefix it already holds of them: the template may write an earlier
        reply differently from how it was generated (its text tokenized afresh, an end-of-turn token
        added), and from where they part the turn is prefilled (`stats["prefilled_tokens"]`). Greedy
        replies are those of `generate` on the whole conversation. `sampling`: temperature, top_k,
        top_p, seed, ignore_eos, as for `generate`. `stream_chat` yields the reply as it comes.
        """
        return _finished(self._chat_turn(message, system, max_new_tokens, sampling))

    def stream_chat(self, message: str, *, system: str | None = None, max_new_tokens: int = 256,
                    **sampling) -> Iterator[str]:
        """`chat`, the reply's text yielded piece by piece as it is generated (`python -m llmopt chat`);
        `session.last` is its `Generation` once the stream ends. A bad turn raises here, at the call."""
        return self._text(self._chat_turn(message, system, max_new_tokens, sampling))

    def _chat_turn(self, message, system, max_new_tokens, sampling):
        """Validate a turn and lay out the conversation; returns the reply's token generator (`_tokens`),
        which adds the reply to `messages` when it finishes."""
        if not isinstance(message, str):
            raise ValueError(f"message must be text, got {type(message).__name__}")
        if system is not None and self.messages:
            raise ValueError("system goes with the first turn: start a new Session for another system message")
        messages = self.messages + ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": message}]
        ids = self.tokenizer.apply_chat_template(messages)
        keep = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)        # the last token is fed, to give the first reply's logits
        tokens = self._begin("", max_new_tokens=max_new_tokens, **sampling, layout=(ids, keep))

        def reply():
            g = yield from tokens
            self.messages = messages + [{"role": "assistant", "content": g.text}]
            return g
        return reply()

    def generate(self, text="", *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 ignore_eos: bool = False) -> Generation:
        """Append `text` (may be empty) and generate `max_new_tokens` more, reusing the cache."""
        return _finished(self._begin(text, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed, ignore_eos=ignore_eos))

    def stream(self, text="", **options) -> Iterator[str]:
        """`generate`, its text yielded piece by piece as it is generated; `session.last` is its
        `Generation` once the stream ends. A bad call raises here, at the call."""
        return self._text(self._begin(text, **options))

    def _text(self, tokens) -> Iterator[str]:
        """Text pieces from a `_tokens` generator (the end-of-sequence token shows none)."""
        text = TextStream(self.tokenizer, [])
        while True:
            try:
                tok = next(tokens)
            except StopIteration as done:
                self.last = done.value
                break
            if tok not in self._eos:
                if piece := text.push(tok):
                    yield piece
        if text.flush():
            yield text.flush_piece

    def _begin(self, text="", *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               ignore_eos: bool = False, layout=None):
        """Validate a call (raising now) and return the generator `_tokens` of its new tokens.
        `layout`: a chat turn's (conversation ids, tokens of them the session keeps)."""
        start = time.perf_counter()
        check_sampling(temperature, top_k, top_p)
        check_seed(seed)
        check_count(max_new_tokens, "max_new_tokens")
        if layout is not None:     # only now, after the checks: a refused turn leaves the session as it was
            ids, keep = layout
            self.ids, self.cached, self._pending = self.ids[:keep], min(self.cached, keep), ids[keep:]
        new_in = self._pending + (self.tokenizer.encode(text) if text else [])
        if not new_in and not self.ids:
            raise ValueError("the session is empty: give it some text first")
        if len(self.ids) + len(new_in) + max_new_tokens > self.max_len:
            raise ValueError(f"this session holds {self.max_len} tokens; {len(self.ids)} used, "
                             f"{len(new_in)} new and {max_new_tokens} to generate do not fit: "
                             "start a new Session (or give it a larger max_len)")
        self._reserve(len(self.ids) + len(new_in) + max_new_tokens)
        gen = seeded_generator(seed, temperature, self.model.device)
        self._eos = _eos_ids(self.tokenizer, ignore_eos)
        return self._tokens(new_in, start, max_new_tokens, (temperature, top_k, top_p, gen))

    @torch.inference_mode()    # around each step only, not over the caller's loop body
    def _tokens(self, new_in: list[int], start: float, max_new_tokens: int, sampling) -> Iterator[int]:
        """Prefill `new_in` after what the cache holds, then decode: yields each new token id (the
        session's ids and cache follow, so a stream left part-way leaves a session that goes on from
        there); returns the `Generation`."""
        eos, dev = self._eos, self.model.device
        self.ids += new_in
        self._pending = []
        feed = self.ids[self.cached:]
        out, times, reason = [], [], "length"
        pos = torch.arange(self.cached, len(self.ids), device=dev)
        logits = self.model(torch.tensor([feed], device=dev), pos, self.cache, last_only=True)[:, -1]
        self.cached = len(self.ids)
        for i in range(max_new_tokens):
            tok = int(sample(logits, *sampling).item())
            out.append(tok)
            times.append(time.perf_counter() - start)
            self.ids.append(tok)
            yield tok
            if tok in eos:
                reason = "eos"
                break
            if i == max_new_tokens - 1:
                break
            logits = decode_one_token(self.model, torch.tensor([[tok]], device=dev),
                                      torch.tensor([self.cached], device=dev), self.cache)
            self.cached += 1
        self.calls += 1                        # (the last token is in self.ids, not yet in the cache)
        stats = timing_stats(times, len(feed))
        stats.update(cache="static", device=str(dev), dtype=str(self.model.dtype).removeprefix("torch."),
                     compiled=False, prefilled_tokens=len(feed), context_tokens=len(self.ids))
        return Generation(token_ids=out, text=self.tokenizer.decode(out) if self.tokenizer else "",
                          prompt_ids=new_in, finish_reason=reason, stats=stats, token_times=times)

    def _reserve(self, tokens: int) -> None:
        """A cache of at least `tokens` slots (at most max_len): the next power of two, the slots
        the conversation has cached copied into it."""
        if self.cache is not None and self.cache.max_len >= tokens:
            return
        size = min(self.max_len, max(MIN_SESSION_CACHE, 1 << (tokens - 1).bit_length()))
        cache = make_cache("static", self.model.config, 1, size, device=self.model.device, dtype=self.model.dtype)
        if self.cache is not None:
            for new, old in zip(cache.k + cache.v, self.cache.k + self.cache.v):
                new[:, :, :self.cached] = old[:, :, :self.cached]
        self.cache = cache
