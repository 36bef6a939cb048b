"""Seeded serving workloads and the load runner that replays them (notebooks 04 and 13).

`poisson_workload` draws requests the way users send them: arrivals as a
Poisson process (exponential gaps at `rate` requests/s), prompts cut from the
held-out corpus (or your own text), and prompt and output lengths either uniform in the given
ranges or drawn from the corpus itself (`lengths="corpus"`: every request is a
turn of the plays' dialogue, as long as that speech). The same seed gives the
same workload, so strategies are compared on equal terms.

`run_load` replays a workload against any server with `submit(prompt, **options)`
returning something with `.result()` (the `Engine`, the `DynamicBatcher`, or
`static_server` below) from several client threads, and returns one row per
request; `summarize_load` turns the rows into throughput and latency percentiles.
"""
from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass

import pandas as pd

from .config import check_count
from .data import load_text


@dataclass
class WorkItem:
    """One request of a workload: when it arrives, its prompt ids and how many tokens it wants."""
    id: int
    arrival_s: float
    prompt_ids: list[int]
    max_new_tokens: int


LENGTHS = ("uniform", "corpus")
# a speech in the plays: its speaker's name line ("FIRST WITCH.") and what they say
_SPEECH = re.compile(r"([A-Z][A-Z' -]*[A-Z])\.\n(\S.*)", re.S)


def poisson_workload(tokenizer, n: int, *, rate: float = float("inf"), seed: int = 0,
                     prompt_tokens: tuple[int, int] = (16, 64),
                     output_tokens: tuple[int, int] = (8, 256), split: str = "test",
                     lengths: str = "uniform", text: str | None = None) -> list[WorkItem]:
    """`n` requests with Poisson arrivals at `rate` per second (inf: all at time 0).

    lengths="uniform": prompt and output lengths are uniform integers in the given
    inclusive ranges; prompts are token spans of the `split` text at random offsets.

    lengths="corpus": each request is a turn of the dialogue in `split`, a speech
    picked at random. Its prompt is the text before the speech up to its speaker's
    name line ("MACBETH.\n"), as many tokens as the speech before it and its name
    line; its output length is its own speech's length in tokens. Both are clipped
    to the ranges. Speech lengths are long-tailed, as chat replies are (the test
    split's 1,566 speeches: median 18 tokens, mean 36, the longest 392): most requests
    are short and a few are long, the case where static batching wastes most.

    `text`: your own text instead of the `split` (for "corpus" lengths, in the plays'
    layout: a speech is a block after a blank line that starts with its speaker's name
    line in capitals, "MACBETH.").
    """
    check_count(n, "n (requests)")
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s (inf for all at once), got {rate}")
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {LENGTHS}, got {lengths!r}")
    for name, (lo, hi) in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be a range (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
    rng = random.Random(seed)
    source = load_text(split) if text is None else text
    if lengths == "corpus":
        draw = _dialogue_turns(tokenizer, source, rng, prompt_tokens, output_tokens)
    else:
        ids = tokenizer.encode(source[:200_000])
        if len(ids) <= prompt_tokens[1]:
            raise ValueError(f"the text has {len(ids)} tokens, too few to cut prompts of up to "
                             f"{prompt_tokens[1]} tokens from: give a longer text or shorter prompt_tokens")

        def draw():
            length = rng.randint(*prompt_tokens)
            start = rng.randrange(0, len(ids) - length)
            return ids[start:start + length], rng.randint(*output_tokens)
    t, items = 0.0, []
    for i in range(n):
        if rate != float("inf"):
            t += rng.expovariate(rate)
        items.append(WorkItem(i, t, *draw()))
    return items


def _dialogue_turns(tokenizer, text: str, rng: random.Random, prompt_tokens, output_tokens):
    """A function drawing (prompt ids, output length) for a random speech of `text`."""
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text) if b.strip()]
    # a speech with at least one block of text before it
    turns = [(j, m) for j in range(1, len(blocks)) if (m := _SPEECH.fullmatch(blocks[j]))]
    if not turns:
        raise ValueError('lengths="corpus" found no speeches in the text (a block after a blank line that '
                         'starts with a name line in capitals, "MACBETH."): use lengths="uniform" for other text')
    clip = lambda v, lo_hi: min(max(v, lo_hi[0]), lo_hi[1])   # noqa: E731

    def draw():
        for _ in range(10_000):
            j, m = rng.choice(turns)
            cue = f"\n\n{m.group(1)}.\n"                 # the speaker's name line ends the prompt
            context = tokenizer.encode("\n\n".join(blocks[max(0, j - 4):j]) + cue)
            want = clip(len(tokenizer.encode(blocks[j - 1] + cue)), prompt_tokens)
            if len(context) >= want:                   # (the first speeches have too little before them)
                return context[-want:], clip(len(tokenizer.encode(m.group(2))), output_tokens)
        raise ValueError(f"no speech in the text has the {prompt_tokens[0]} tokens before it that "
                         f"prompt_tokens={prompt_tokens} asks for: give a longer text or shorter prompt_tokens")
    return draw


def static_server(model, tokenizer, *, batch_size: int = 8, max_wait_s: float = 0.05):
    """Static batching as a server: requests wait until `batch_size` have queued (or
    `max_wait_s` passed since the oldest), then run together until the longest is
    done. The baseline the continuous engine is compared with: a `DynamicBatcher`
    in arrival order with no token budget, so both share one tested code path."""
    from .batching import DynamicBatcher
    return DynamicBatcher(model, tokenizer, max_batch_size=batch_size, max_batch_tokens=10**9,
                          max_wait_s=max_wait_s, sort_by_length=False)


def run_load(server, workload: list[WorkItem], *, clients: int = 16, realtime: bool = True,
             **options) -> pd.DataFrame:
    """Replay `workload` against `server` from `clients` threads; one row per request.

    Each client takes every `clients`-th request, sleeps until its arrival time
    (when `realtime`), submits it and waits for the result. Columns: id, ok,
    error, arrival_s, queue_s, ttft_s, tpot_s, e2e_s (from submission), new_tokens,
    finished_s (since the run started). A failed request is a row with ok=False,
    never a missing row.
    """
    rows: list[dict] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def client(k: int) -> None:
        for item in workload[k::clients]:
            if realtime:
                delay = item.arrival_s - (time.perf_counter() - t0)
                if delay > 0:
                    time.sleep(delay)
            row = dict(id=item.id, arrival_s=item.arrival_s, prompt_tokens=len(item.prompt_ids),
                       max_new_tokens=item.max_new_tokens)
            try:
                g = server.submit(item.prompt_ids, max_new_tokens=item.max_new_tokens,
                                  **options).result()
                row.update(ok=True, error="", new_tokens=len(g.token_ids),
                           queue_s=g.stats.get("queue_s", float("nan")), ttft_s=g.stats["ttft_s"],
                           tpot_s=g.stats["tpot_s"], e2e_s=g.stats["e2e_s"], token_ids=g.token_ids)
            except Exception as e:   # recorded, so nothing is silently lost
                row.update(ok=False, error=f"{type(e).__name__}: {e}", new_tokens=0)
            row["finished_s"] = time.perf_counter() - t0
            with lock:
                rows.append(row)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return pd.DataFrame(rows).sort_values("id").reset_index(drop=True)


def summarize_load(df: pd.DataFrame, label: str = "", submitted: int | None = None) -> dict:
    """Throughput and latency percentiles of a `run_load` frame (one row per request)."""
    ok = df[df["ok"]]
    wall = float(df["finished_s"].max())
    out = dict(label=label, requests=len(df), completed=len(ok),
               failed=int((~df["ok"]).sum()),
               lost=(submitted - len(df)) if submitted is not None else 0,
               wall_s=wall, tokens=int(ok["new_tokens"].sum()),
               tokens_per_s=float(ok["new_tokens"].sum()) / wall if wall > 0 else float("nan"),
               requests_per_s=len(ok) / wall if wall > 0 else float("nan"))
    for col in ("e2e_s", "ttft_s", "tpot_s", "queue_s"):
        if col in ok and len(ok):
            for q in (50, 95, 99):
                out[f"{col.removesuffix('_s')}_p{q}_s"] = float(ok[col].quantile(q / 100))
    return out


def compare_batching(model, tokenizer, workload: list[WorkItem], *, slots: int = 8,
                     max_batch_tokens: int | None = None, repeats: int = 1,
                     overlap: bool = False, gather_every_step: bool = False,
                     prefill_alone: bool = False, cuda_graphs: bool = False) -> list[dict]:
    """Offline throughput of static, dynamic and continuous batching on one workload
    (continuous twice: first come first served, and longest budget first; with `overlap`
    once more, first come first served with `Engine(overlap=True)`; with
    `gather_every_step` once more with `Engine(keep_gathered=False)`, which gathers
    every row's KV blocks into order in every layer of every step; with `prefill_alone`
    once more with `Engine(mixed_steps=False)`, which runs each new prompt in a forward
    of its own instead of inside a decode step; with `cuda_graphs` three times more, static
    batching with `generate_batch(cuda_graphs=True)` and continuous batching, first come
    first served and longest first, with `Engine(cuda_graphs=True, overlap=True)`, whose
    steps replay CUDA graphs on a GPU: such an engine is kept across repeats, so only its first
    repeat records graphs; its rows add first_wall_s, graphs_recorded, graph_replays,
    graph_steps (over all repeats) and graph_error; every graph row adds
    throughput_vs_static_graphs (and its _min, _max), against static batching with graphs).

    Every request is there at time 0 and runs to exactly its `max_new_tokens`
    (end-of-sequence ignored), so the three do the same useful work. Repeats are
    interleaved (static, dynamic, continuous, static, ...) and the median wall time
    kept, so drifting machine speed hits all three alike; `throughput_vs_static` is
    the median over repeats of each run's speed against the static run of the same
    repeat (`_min` and `_max`: the spread over repeats). Rows: label, tokens, wall_s,
    tokens_per_s, forwards (decode steps run, prefills included), throughput_vs_static,
    identical (every output equal to static batching's), tie_partings (outputs that part
    from static batching's at a rounding near-tie, `llmopt.metrics.greedy_divergence`: a
    bf16 checkpoint's batch shapes may flip one) and same_greedy (every output identical
    or parted at a tie: what to assert).
    """
    from statistics import median
    from .batching import DynamicBatcher
    from .engine import Engine
    from .metrics import greedy_divergence
    prompts = [w.prompt_ids for w in workload]
    max_new = [w.max_new_tokens for w in workload]
    budget = max_batch_tokens or slots * (max(map(len, prompts)) + max(max_new))

    def static(cuda_graphs=False):
        b = DynamicBatcher(model, tokenizer, max_batch_size=slots, max_batch_tokens=10**9,
                           sort_by_length=False, cuda_graphs=cuda_graphs)
        out = b.run(prompts, max_new_tokens=max_new, ignore_eos=True)
        # one prefill and then as many steps as the batch's longest request, per batch
        return out, sum(max(g.stats["new_tokens"] for g in out[i:i + slots])
                        for i in range(0, len(out), slots))

    def dynamic():
        b = DynamicBatcher(model, tokenizer, max_batch_size=slots, max_batch_tokens=budget,
                           sort_by_length=True)
        out = b.run(prompts, max_new_tokens=max_new, ignore_eos=True)
        return out, sum(x["steps"] for x in b.batches if x["outcome"] == "ok")

    kept: dict[str, Engine] = {}

    def continuous(policy="fcfs", overlap=False, keep_gathered=True, mixed_steps=True, graphs_row=None):
        # an engine with CUDA graphs (`graphs_row`: its label) is built once and kept across
        # repeats, as a server keeps its recorded graphs: its first repeat records them
        e = kept.get(graphs_row) or Engine(model, tokenizer, max_batch_size=slots, policy=policy,
                                           overlap=overlap, keep_gathered=keep_gathered,
                                           mixed_steps=mixed_steps, cuda_graphs=graphs_row is not None)
        if graphs_row is not None:
            kept[graphs_row] = e
        before = e.forwards
        return e.generate_many(prompts, max_new_tokens=max_new, ignore_eos=True), e.forwards - before

    runs = {"static batching": static, "dynamic batching (length-aware)": dynamic,
            "continuous batching": continuous,
            "continuous batching, longest first": lambda: continuous("longest-first")}
    if overlap:
        runs["continuous batching, overlapped"] = lambda: continuous(overlap=True)
    if gather_every_step:
        runs["continuous batching, gathering every step"] = lambda: continuous(keep_gathered=False)
    if prefill_alone:
        runs["continuous batching, each prompt prefilled alone"] = lambda: continuous(mixed_steps=False)
    if cuda_graphs:
        runs["static batching, CUDA graphs"] = lambda: static(cuda_graphs=True)
        # overlapped: with the step's launches down to one graph, the host's bookkeeping is what is
        # left, and it can run while the device computes (static batching reads every step back)
        for policy, label in (("fcfs", "continuous batching, CUDA graphs, overlapped"),
                              ("longest-first", "continuous batching, longest first, CUDA graphs, overlapped")):
            runs[label] = lambda policy=policy, label=label: continuous(policy, overlap=True, graphs_row=label)
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs, forwards = {}, {}
    for _ in range(repeats):
        for label, fn in runs.items():
            t0 = time.perf_counter()
            outputs[label], forwards[label] = fn()
            times[label].append(time.perf_counter() - t0)
    tokens = sum(max_new)
    reference = [g.token_ids for g in outputs["static batching"]]
    rows = []
    for label in runs:
        wall = median(times[label])
        partings = [greedy_divergence(model, p, a, g.token_ids)
                    for p, a, g in zip(prompts, reference, outputs[label], strict=True)]
        rows.append(dict(label=label, requests=len(workload), slots=slots, tokens=tokens, wall_s=wall,
                         tokens_per_s=tokens / wall, forwards=forwards[label],
                         identical=all(d["identical"] for d in partings),
                         tie_partings=sum(d["tie"] for d in partings),
                         same_greedy=all(d["identical"] or d["tie"] for d in partings)))
        if label == "static batching, CUDA graphs":      # the graphs kept per model (one per batch shape)
            from .generate import kept_graphs
            rows[-1].update(graph_error=next((g.error for g in kept_graphs(model, "batch") if g.error), None))
        if label in kept:
            g = kept[label].graphs
            rows[-1].update(first_wall_s=times[label][0], graphs_recorded=g.recorded, graph_replays=g.replays,
                            graph_steps=g.steps, graph_error=g.error)
    for r in rows:   # per repeat, against the static run just before it: drift between repeats cancels
        ratios = [s / t for s, t in zip(times["static batching"], times[r["label"]])]
        r.update(throughput_vs_static=median(ratios), throughput_vs_static_min=min(ratios),
                 throughput_vs_static_max=max(ratios))
        if "CUDA graphs" in r["label"]:   # like for like: against static batching with graphs too
            ratios = [s / t for s, t in zip(times["static batching, CUDA graphs"], times[r["label"]])]
            r.update(throughput_vs_static_graphs=median(ratios), throughput_vs_static_graphs_min=min(ratios),
                     throughput_vs_static_graphs_max=max(ratios))
    return rows


def prefill_stall(model, tokenizer, *, running: int = 8, long_prompt_tokens: int = 1800,
                  max_new_tokens: int = 160, label: str = "", **engine_options) -> dict:
    """What a long prompt arriving mid-decode does to the requests already running (notebook 13).

    `running` requests (16-token prompts from the held-out text) start decoding
    `max_new_tokens` each; once each has about 8 tokens, a `long_prompt_tokens` prompt
    arrives. The running requests' gaps between consecutive tokens (the engine's own
    arrival times) show the stall: without chunked prefill one step carries the whole
    prompt, so every running request waits for it. Returns the gaps' max, p99 and median,
    the long prompt's time to first token, and every request's token ids (to check the
    greedy output). `engine_options` go to the `Engine` (`chunked_prefill=True`,
    `max_prefill_tokens=...`). The engine first serves the same prompts once, 4 tokens each
    (warm-up); with `cuda_graphs`, a bucket first met during the run is recorded then, inside a gap.
    """
    import numpy as np
    from .engine import Engine
    from .metrics import heldout_ids
    long_prompt_tokens = min(long_prompt_tokens, model.config.max_seq_len - 16)
    text = heldout_ids(tokenizer, "test", max_tokens=long_prompt_tokens + 20 * running + 16).tolist()
    long_prompt = text[:long_prompt_tokens]
    short = [text[long_prompt_tokens + 20 * i:long_prompt_tokens + 20 * i + 16] for i in range(running)]
    with Engine(model, tokenizer, max_batch_size=running + 1, **engine_options) as engine:
        engine.generate_many(short + [long_prompt], max_new_tokens=4, ignore_eos=True)    # warm-up, same shapes
        start, first_step = engine.tokens_generated, len(engine.step_log)
        handles = [engine.submit(p, max_new_tokens=max_new_tokens, ignore_eos=True) for p in short]
        while engine.tokens_generated - start < 8 * running and not all(h.done() for h in handles):
            time.sleep(0.001)
        big = engine.submit(long_prompt, max_new_tokens=8, ignore_eos=True)
        gens, long_gen = [h.result() for h in handles], big.result()
    gaps = np.concatenate([np.diff(g.token_times) for g in gens])
    return dict(label=label, max_gap_s=float(gaps.max()), p99_gap_s=float(np.percentile(gaps, 99)),
                median_gap_s=float(np.median(gaps)), long_ttft_s=long_gen.stats["ttft_s"],
                long_prompt_tokens=long_prompt_tokens,
                max_step_prefill_tokens=max(s["prefill_tokens"] for s in engine.step_log[first_step:]),
                token_ids=[g.token_ids for g in gens + [long_gen]], prompts=short + [long_prompt])


def speculation_by_batch(model, tokenizer, speculative, *, sizes=(1, 4, 16), k: int = 4, max_new_tokens: int = 64,
                         prompt_tokens: int = 32, repeats: int = 3, temperature: float = 0.0, label: str = "",
                         **engine_options) -> list[dict]:
    """Speculative decoding inside the engine, as the batch grows (notebook 09): for each batch
    size B, B requests (`prompt_tokens`-token prompts from the held-out text, `max_new_tokens`
    each, greedy, or sampled at `temperature` with request i seeded i) served at once by an
    `Engine(max_batch_size=B)`, without speculation and with `speculative` (a draft, as `Engine`
    takes) proposing `k` tokens a row a step.

    One row per batch size: each engine's tokens/s (the median of `repeats` runs, after one
    warm-up), their ratio `speedup`, the model forwards per generated token of each, the
    acceptance rate and whether the outputs were identical (greedy; None when sampled: the same
    distribution, other draws). At batch 1 a decode step reads the
    weights for one token, so verifying k more costs little on a GPU; as the batch grows the step
    becomes compute-bound and the drafts' extra tokens cost as much as real ones, so the speed-up
    shrinks (`speculative.speculation_vs_batch` predicts where from timed forwards).
    """
    import statistics
    from .engine import Engine
    from .metrics import heldout_ids
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
        raise ValueError(f"sizes must be positive integers (batch sizes), got {sizes!r}")
    check_count(repeats, "repeats")
    text = heldout_ids(tokenizer, "test", max_tokens=(prompt_tokens + 40) * max(sizes)).tolist()
    rows = []
    for b in sizes:
        prompts = [text[i * (prompt_tokens + 40):i * (prompt_tokens + 40) + prompt_tokens] for i in range(b)]
        row = dict(label=label, batch_size=b, k=k, temperature=temperature)
        seeds = dict(temperature=temperature, seed=list(range(b))) if temperature else {}
        outputs = {}
        for name, spec in (("plain", None), ("speculative", speculative)):
            with Engine(model, tokenizer, max_batch_size=b, speculative=spec,
                        num_speculative_tokens=k, **engine_options) as engine:
                engine.generate_many(prompts, max_new_tokens=8, ignore_eos=True, **seeds)      # warm-up
                rates = []
                for _ in range(repeats):
                    tokens, forwards, drafted = engine.tokens_generated, engine.forwards, engine.drafted
                    t0 = time.perf_counter()
                    outs = engine.generate_many(prompts, max_new_tokens=max_new_tokens, ignore_eos=True, **seeds)
                    rates.append((engine.tokens_generated - tokens) / (time.perf_counter() - t0))
                row[f"{name}_tokens_per_s"] = statistics.median(rates)
                row[f"{name}_forwards_per_token"] = (engine.forwards - forwards) / (engine.tokens_generated - tokens)
                outputs[name] = [o.token_ids for o in outs]
                if spec is not None:
                    row["acceptance_rate"] = engine.acceptance_rate
                    row["drafted_per_token"] = (engine.drafted - drafted) / (engine.tokens_generated - tokens)
        row["speedup"] = row["speculative_tokens_per_s"] / row["plain_tokens_per_s"]
        row["identical"] = outputs["plain"] == outputs["speculative"] if not temperature else None
        rows.append(row)
    return rows


def ideal_continuous_speedup(output_tokens: list[int], slots: int) -> dict:
    """Decode steps static vs continuous batching need for these output lengths (all at time 0).

    Static: each batch of `slots` runs as long as its longest request. Continuous,
    first come first served: a request takes the first free slot. With equal step
    costs the ratio of steps is the speed-up to expect (the lower bound on
    continuous steps is total tokens / slots). "Longest first" orders the queue by
    output length, which only helps when lengths are known up front: continuous
    batching then nearly reaches the bound, and static batches of similar lengths
    lose little too (`static_longest_first_steps`).
    """
    import heapq

    def static_steps(lengths):
        return sum(max(lengths[i:i + slots]) for i in range(0, len(lengths), slots))

    def continuous_steps(lengths):
        free_at = [0] * slots
        for n in lengths:
            heapq.heappush(free_at, heapq.heappop(free_at) + n)
        return max(free_at)

    static, continuous = static_steps(output_tokens), continuous_steps(output_tokens)
    longest = sorted(output_tokens, reverse=True)
    lpt = continuous_steps(longest)
    return dict(static_steps=static, continuous_steps=continuous,
                ideal_steps=sum(output_tokens) / slots, step_ratio=static / continuous,
                bound_ratio=static / (sum(output_tokens) / slots),
                longest_first_steps=lpt, longest_first_step_ratio=static / lpt,
                static_longest_first_steps=static_steps(longest))
