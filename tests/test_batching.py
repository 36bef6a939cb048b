"""Static, dynamic and continuous batching: batched output equals unbatched, nothing is lost."""
import threading
from concurrent.futures import CancelledError

import pytest
import torch

import llmopt
from llmopt.batching import DynamicBatcher, MemoryBudgetExceeded, generate_batch
from llmopt.engine import Engine
from llmopt.workload import (compare_batching, ideal_continuous_speedup, poisson_workload, prefill_stall,
                             run_load, static_server, summarize_load)

PROMPTS = ["ROMEO:", "To be, or not to be, that is the question:\nWhether 'tis nobler",
           "KING:\nNow", "A", "JULIET:\nO Romeo, Romeo", "First Citizen:\nBefore we proceed any further"]


@pytest.fixture(scope="module")
def tiny():
    return llmopt.load_model("tiny")


@pytest.fixture(scope="module")
def reference(tiny):
    """Each prompt's unbatched greedy output, 48 tokens, end-of-sequence ignored."""
    model, tok = tiny
    return {p: llmopt.generate(model, tok, p, max_new_tokens=48, ignore_eos=True).token_ids
            for p in PROMPTS}


@pytest.fixture(scope="module")
def llama(small_tokenizer_dir, tmp_path_factory):
    from conftest import make_hf_checkpoint
    folder = tmp_path_factory.mktemp("llama-batch")
    make_hf_checkpoint("llama", folder, small_tokenizer_dir)
    return llmopt.load_model(folder)


@pytest.mark.parametrize("options", [{}, dict(prefix_caching=True), dict(overlap=True), dict(num_blocks=28, watermark=0),
                                     dict(keep_gathered=False), dict(cuda_graphs=True)])
def test_chunked_prefill_gives_unbatched_greedy_within_the_step_budget(tiny, options):
    """Prompts up to 200 tokens through 32-token steps: each request's tokens are its unbatched greedy ones
    (with the prefix cache, with overlap, with preemption for want of blocks, gathering every step, and
    through the CUDA-graph path), no step carries more than 32 prompt tokens, and the prompts took at
    least their tokens / 32 steps."""
    model, tok = tiny
    work = poisson_workload(tok, 16, seed=0, prompt_tokens=(8, 200), output_tokens=(4, 24))
    prompts, budgets = [w.prompt_ids for w in work], [w.max_new_tokens for w in work]
    with Engine(model, tok, max_batch_size=4, chunked_prefill=True, max_prefill_tokens=32, **options) as engine:
        outs = engine.generate_many(prompts, max_new_tokens=budgets, ignore_eos=True)
        steps = [s["prefill_tokens"] for s in engine.step_log]
    for p, b, g in zip(prompts, budgets, outs):
        assert g.token_ids == llmopt.generate(model, tok, p, max_new_tokens=b, ignore_eos=True).token_ids
    assert max(steps) == 32 and sum(1 for n in steps if n) >= sum(map(len, prompts)) // 32 // 2
    if options.get("num_blocks"):
        assert engine.scheduler.preemptions > 0


def test_chunked_prefill_shares_prefixes_forks_samples_and_stops(tiny):
    """A shared system prompt computed in 8-token chunks is found by the prompts after it (its blocks
    enter the prefix cache as they are computed); n samples fork after the chunked prompt as without
    chunks; stop strings cut where generate cuts."""
    model, tok = tiny
    system = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
              "First Citizen:\nYou are all resolved rather to die than to famish?\n\n")
    prompts = [system + s for s in ["All:\nResolved.", "Second Citizen:\nNay,", "MENENIUS:\nWhat work"]]
    with Engine(model, tok, max_batch_size=2, chunked_prefill=True, max_prefill_tokens=8,
                prefix_caching=True) as engine:
        outs = engine.generate_many(prompts, max_new_tokens=16, ignore_eos=True)
        samples = engine.sample_n(prompts[0], 3, seed=3, max_new_tokens=12, temperature=0.9)
        stopped = engine.submit(prompts[1], max_new_tokens=30, stop=["\n\n"]).result()
    assert [g.token_ids for g in outs] == \
        [llmopt.generate(model, tok, p, max_new_tokens=16, ignore_eos=True).token_ids for p in prompts]
    assert [g.stats["cached_prompt_tokens"] for g in outs][1:] == [48, 48]
    with Engine(model, tok, max_batch_size=3) as engine:
        assert [g.token_ids for g in samples] == \
            [g.token_ids for g in engine.sample_n(prompts[0], 3, seed=3, max_new_tokens=12, temperature=0.9)]
    assert stopped.text == llmopt.generate(model, tok, prompts[1], max_new_tokens=30, stop=["\n\n"]).text


def test_a_long_prompt_mid_decode_takes_one_step_or_budgeted_chunks(tiny):
    """prefill_stall: a 600-token prompt arriving while 4 requests decode is one step's work without
    chunked prefill and at most 64 tokens a step with it; every output is its unbatched greedy one
    either way. (How much shorter the running requests' longest wait gets is a timing: notebook 13.)"""
    model, tok = tiny
    for chunked in (False, True):
        r = prefill_stall(model, tok, running=4, long_prompt_tokens=600, max_new_tokens=32,
                          chunked_prefill=chunked, max_prefill_tokens=64)
        assert r["max_step_prefill_tokens"] == (64 if chunked else 600)
        assert r["max_gap_s"] >= r["p99_gap_s"] >= r["median_gap_s"] > 0 and r["long_ttft_s"] > 0
        for prompt, ids in zip(r["prompts"], r["token_ids"]):
            assert ids == llmopt.generate(model, tok, prompt, max_new_tokens=len(ids), ignore_eos=True).token_ids
    with pytest.raises(ValueError, match="needs mixed_steps=True"):
        Engine(model, tok, chunked_prefill=True, mixed_steps=False)
    with pytest.raises(ValueError, match="chunked_prefill must be True or False"):
        Engine(model, tok, chunked_prefill="yes")


# ---- static batching ------------------------------------------------------------------------
def test_every_batching_stops_at_a_stop_string_where_generate_does(tiny):
    """Each row of a static batch, each request of the dynamic batcher and of the engine watches its own
    text for the stop strings: cut where unbatched generate cuts, with the same tokens up to there."""
    model, tok = tiny
    stop = [",", "\n\n"]
    want = [llmopt.generate(model, tok, p, max_new_tokens=40, stop=stop) for p in PROMPTS]
    assert {g.finish_reason for g in want} == {"stop"}
    with DynamicBatcher(model, tok, max_batch_size=4) as batcher:
        futures = [batcher.submit(p, max_new_tokens=40, stop=stop) for p in PROMPTS]
        dynamic = [f.result() for f in futures]
    with Engine(model, tok, max_batch_size=4) as engine:
        continuous = [h.result() for h in [engine.submit(p, max_new_tokens=40, stop=stop) for p in PROMPTS]]
    for got in (generate_batch(model, tok, PROMPTS, max_new_tokens=40, stop=stop), dynamic, continuous):
        assert [(g.text, g.token_ids, g.finish_reason) for g in got] == \
            [(g.text, g.token_ids, g.finish_reason) for g in want]


@pytest.mark.parametrize("cache", ["static", "dynamic", "paged", "none"])
def test_batched_greedy_equals_unbatched_for_every_cache(tiny, reference, cache):
    model, tok = tiny
    lengths = [48, 10, 30, 1, 48, 20]
    out = generate_batch(model, tok, PROMPTS, max_new_tokens=lengths, cache=cache, ignore_eos=True)
    assert len({len(g.prompt_ids) for g in out}) > 3            # really different lengths
    for p, n, g in zip(PROMPTS, lengths, out):
        assert g.token_ids == reference[p][:n]
        assert g.text == tok.decode(g.token_ids)
        assert g.stats["batch_size"] == len(PROMPTS)
    assert 0 < out[0].stats["padding_fraction"] < 1


def test_batched_logits_match_unbatched_on_a_transformers_checkpoint(llama):
    """Left padding, per-row positions and the key mask leave each row's logits unchanged."""
    model, _ = llama
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 17, 11)]
    out = generate_batch(model, None, rows, max_new_tokens=12, ignore_eos=True)
    for ids, got in zip(rows, out):
        assert got.token_ids == llmopt.generate(model, None, ids, max_new_tokens=12,
                                                ignore_eos=True).token_ids
    T = max(map(len, rows))
    tokens = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    pad = torch.tensor([T - len(r) for r in rows])[:, None]
    slots = torch.arange(T)
    with torch.no_grad():
        batched = model(tokens, positions=(slots - pad).clamp(min=0), key_mask=slots >= pad)
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]))[0]
            torch.testing.assert_close(batched[i, T - len(r):], alone, atol=1e-5, rtol=1e-5)


def test_batched_sampling_matches_unbatched_per_seed(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.95)
    seeds = [1, 2, 3]
    out = generate_batch(model, tok, PROMPTS[:3], seed=seeds, **kw)
    for p, s, g in zip(PROMPTS, seeds, out):
        assert g.token_ids == llmopt.generate(model, tok, p, seed=s, **kw).token_ids


def test_static_batching_with_cuda_graphs_equals_unbatched(tiny, reference):
    """generate_batch(cuda_graphs=True): one step recorded per batch and replayed (on a CPU, the
    same step eagerly); greedy and seeded outputs unchanged; the graph and its cache are kept
    per model for the next batch of that shape (the last KEPT_CACHES shapes) and made anew when
    the size or a weight changes."""
    from llmopt.batching import batch_step_graph
    from llmopt.generate import KEPT_CACHES, kept_graphs
    model, tok = tiny
    lengths = [48, 10, 30, 1, 48, 20]
    out = generate_batch(model, tok, PROMPTS, max_new_tokens=lengths, ignore_eos=True, cuda_graphs=True)
    assert [g.token_ids for g in out] == [reference[p][:n] for p, n in zip(PROMPTS, lengths)]
    assert out[0].stats["cuda_graphs"] is True
    [kept] = kept_graphs(model, "batch")
    assert kept.cache.max_len == 256 and kept.batch == len(PROMPTS)      # slots rounded up to 256
    again = generate_batch(model, tok, PROMPTS[::-1], max_new_tokens=24, ignore_eos=True, cuda_graphs=True)
    assert [g.token_ids for g in again] == [reference[p][:24] for p in PROMPTS[::-1]]   # stale slots masked
    assert kept_graphs(model, "batch") == [kept] and kept.replays == 0 and kept.error is None  # a CPU: eager
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.95)
    sampled = generate_batch(model, tok, PROMPTS[:3], seed=[1, 2, 3], cuda_graphs=True, **kw)
    assert [g.token_ids for g in sampled] == \
        [g.token_ids for g in generate_batch(model, tok, PROMPTS[:3], seed=[1, 2, 3], **kw)]
    assert kept_graphs(model, "batch")[0] is kept                      # another batch size: kept beside it
    three = kept_graphs(model, "batch")[-1]
    assert three is not kept and three.batch == 3
    longer = generate_batch(model, tok, PROMPTS, max_new_tokens=256, ignore_eos=True, cuda_graphs=True)
    assert [g.token_ids[:48] for g in longer] == [reference[p] for p in PROMPTS]
    assert kept_graphs(model, "batch")[-1].cache.max_len == 512         # a longer batch, its own cache
    generate_batch(model, tok, PROMPTS, max_new_tokens=8, ignore_eos=True, cuda_graphs=True)
    assert kept_graphs(model, "batch")[-1] is kept                      # back to 256 slots: the same graph
    assert batch_step_graph(model, three.cache, 3) is three
    with torch.no_grad():
        model.norm.weight.mul_(1.0)                                     # a weight changed in place
    assert batch_step_graph(model, three.cache, 3) is not three
    for n in range(2, 2 + KEPT_CACHES):                                 # more shapes than are kept
        generate_batch(model, tok, PROMPTS[:n], max_new_tokens=4, cuda_graphs=True)
    assert len(kept_graphs(model, "batch")) == KEPT_CACHES and kept not in kept_graphs(model, "batch")
    for kwargs, message in [(dict(cache="dynamic"), "cache='static'"), (dict(compile=True), "without compile"),
                            (dict(cuda_graphs="yes"), "cuda_graphs must be True or False")]:
        with pytest.raises(ValueError, match=message):
            generate_batch(model, tok, PROMPTS[:2], **{"cuda_graphs": True, **kwargs})
    with pytest.raises(ValueError, match="cuda_graphs"):
        DynamicBatcher(model, tok, cache="paged", cuda_graphs=True)
    b = DynamicBatcher(model, tok, max_batch_size=4, cuda_graphs=True)
    assert [g.token_ids for g in b.run(PROMPTS, max_new_tokens=12, ignore_eos=True)] == \
        [reference[p][:12] for p in PROMPTS]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_batching_cuda_graphs_record_and_replay():
    model, tok = llmopt.load_model("tiny", device="cuda", dtype="fp32")
    lengths = [48, 10, 30, 1, 48, 20]
    eager = generate_batch(model, tok, PROMPTS, max_new_tokens=lengths, ignore_eos=True)
    graphed = generate_batch(model, tok, PROMPTS, max_new_tokens=lengths, ignore_eos=True, cuda_graphs=True)
    from llmopt.generate import kept_graphs
    [g] = kept_graphs(model, "batch")
    assert g.error is None and g.graph is not None and g.replays == max(lengths) - 2   # step 1 records
    assert [x.token_ids for x in graphed] == [x.token_ids for x in eager]
    again = generate_batch(model, tok, PROMPTS[::-1], max_new_tokens=24, ignore_eos=True, cuda_graphs=True)
    assert kept_graphs(model, "batch") == [g]               # the same graph, replayed for the next batch
    assert [x.token_ids for x in again] == \
        [x.token_ids for x in generate_batch(model, tok, PROMPTS[::-1], max_new_tokens=24, ignore_eos=True)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts="ROMEO:"), "non-empty list"),
    (dict(prompts=["A", ""]), "empty"),
    (dict(prompts=["A", "B"], max_new_tokens=[4]), "one per prompt"),
    (dict(prompts=["A"], temperature=-1), "temperature"),
    (dict(prompts=["A"], max_new_tokens=5000), "context"),
])
def test_generate_batch_bad_input(tiny, kwargs, message):
    model, tok = tiny
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=message):
        generate_batch(model, tok, prompts, **kwargs)


def test_memory_budget_refuses_before_allocating(tiny):
    model, tok = tiny
    with pytest.raises(MemoryBudgetExceeded, match="split the batch"):
        generate_batch(model, tok, PROMPTS, max_new_tokens=64, memory_budget=100_000)


# ---- dynamic batching -----------------------------------------------------------------------
def test_dynamic_batcher_splits_on_memory_and_returns_every_result(tiny, reference):
    model, tok = tiny
    one = llmopt.batching.batch_memory_bytes(model.config, 1, 20, 60)
    with DynamicBatcher(model, tok, max_batch_size=6, memory_budget=3 * one) as b:
        futures = [b.submit(p, max_new_tokens=40, ignore_eos=True) for p in PROMPTS * 2]
        results = [f.result(timeout=60) for f in futures]
    assert [g.token_ids for g in results] == [reference[p][:40] for p in PROMPTS * 2]
    assert any(x["outcome"] == "split" for x in b.batches)
    assert sum(x["size"] for x in b.batches if x["outcome"] == "ok") == len(futures)  # none twice


def test_dynamic_batcher_token_budget_and_lone_failure(tiny, reference):
    model, tok = tiny
    b = DynamicBatcher(model, tok, max_batch_size=8, max_batch_tokens=4 * 60, memory_budget=None)
    out = b.run(PROMPTS, max_new_tokens=[40, 40, 40, 10, 40, 40], ignore_eos=True)
    assert [g.token_ids for g in out] == [reference[p][:n] for p, n in zip(PROMPTS, [40, 40, 40, 10, 40, 40])]
    assert max(x["size"] for x in b.batches) <= 4
    # a request that cannot fit even alone fails alone; its neighbours complete
    small = llmopt.batching.batch_memory_bytes(model.config, 1, 16, 60)
    with DynamicBatcher(model, tok, max_batch_size=4, memory_budget=small) as b2:
        ok = b2.submit("A", max_new_tokens=8, ignore_eos=True)
        too_big = b2.submit(PROMPTS[5], max_new_tokens=300, ignore_eos=True)
        ok2 = b2.submit("ROMEO:", max_new_tokens=8, ignore_eos=True)
        with pytest.raises(MemoryError, match="even alone"):
            too_big.result(timeout=60)
        assert ok.result(timeout=60).token_ids == reference["A"][:8]
        assert ok2.result(timeout=60).token_ids == reference["ROMEO:"][:8]
    with pytest.raises(RuntimeError, match="closed"):
        b2.submit("A")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        b.submit("A", max_new_tokens=1000)


def test_dynamic_batcher_a_faulty_request_fails_alone(tiny, reference):
    """A fault that fails a batched run (here detokenizing one request's output) reruns the batch's
    requests one by one: the faulty one fails with its own error, its neighbours complete."""
    model, tok = tiny

    class Touchy:                                    # decoding exactly 7 tokens raises
        eos_token_ids = tok.eos_token_ids

        def encode(self, text):
            return tok.encode(text)

        def decode(self, ids):
            if len(ids) == 7:
                raise RuntimeError("detokenizer exploded")
            return tok.decode(ids)

    lengths = [12, 7, 12, 12]
    with DynamicBatcher(model, Touchy(), max_batch_size=4, max_wait_s=0.5) as b:
        futures = [b.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, lengths)]
        with pytest.raises(RuntimeError, match="exploded"):
            futures[1].result(timeout=60)
        for f, p, n in zip(futures, PROMPTS, lengths):
            if n == 12:
                assert f.result(timeout=60).token_ids == reference[p][:12]
    assert b.batches[0]["outcome"] == "failed (RuntimeError), rerun one by one" and b.batches[0]["size"] == 4
    assert sum(x["size"] for x in b.batches if x["outcome"] == "ok") == 3


# ---- continuous batching --------------------------------------------------------------------
@pytest.mark.parametrize("overlap, keep_gathered, mixed", [(False, True, True), (True, True, True),
                                                            (False, False, True), (False, True, False)])
def test_engine_output_equals_unbatched(tiny, reference, overlap, keep_gathered, mixed):
    model, tok = tiny
    lengths = [48, 5, 33, 17, 48, 1, 40, 9, 26, 48, 12, 30]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    with Engine(model, tok, overlap=overlap, max_batch_size=4, keep_gathered=keep_gathered,
                mixed_steps=mixed) as engine:
        handles = [engine.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)]
        out = [h.result(timeout=120) for h in handles]
    for p, n, g in zip(prompts, lengths, out):
        assert g.token_ids == reference[p][:n]
        assert g.stats["queue_s"] >= 0 and g.stats["ttft_s"] >= g.stats["queue_s"]
        assert g.stats["e2e_s"] >= g.stats["ttft_s"]
    assert max(s["rows"] for s in engine.step_log) == 4          # the batch was really full
    assert engine.cache.manager.num_free == engine.cache.manager.num_blocks   # every block came back
    # the rows' blocks are gathered into order only when the running rows change
    decode_steps = sum(s["rows"] > 0 for s in engine.step_log)
    assert 0 < engine.cache.gathers < decode_steps / 2 if keep_gathered else engine.cache.gathers == 0
    assert engine.cache.gathered[0] is None                      # idle: the kept copy is freed
    log = engine.step_log
    if mixed:   # new prompts ran inside decode steps: one forward a step, none of their own
        assert any(s["rows"] and s["prefills"] for s in log)
        assert engine.forwards == sum(1 for s in log if s["rows"] or s["prefills"])
    else:       # a forward per prefill, then the step's
        assert engine.forwards == decode_steps + sum(s["prefills"] for s in log)


def test_mixed_steps_take_prompts_up_to_their_token_budget(tiny, reference):
    model, tok = tiny
    wide = Engine(model, tok, max_batch_size=4)
    narrow = Engine(model, tok, max_batch_size=4, max_prefill_tokens=1)     # one prompt a step
    for engine in (wide, narrow):
        out = engine.generate_many(PROMPTS[:4], max_new_tokens=8, ignore_eos=True)
        assert [g.token_ids for g in out] == [reference[p][:8] for p in PROMPTS[:4]]
    assert wide.step_log[0]["prefills"] == 4 and max(s["prefills"] for s in narrow.step_log) == 1
    for kwargs, message in [(dict(mixed_steps="yes"), "mixed_steps must be True or False"),
                            (dict(max_prefill_tokens=0), "max_prefill_tokens must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message):
            Engine(model, tok, **kwargs)


def test_engine_refuses_bad_construction_options(tiny):
    for kwargs, message in [(dict(keep_gathered="yes"), "keep_gathered must be True or False"),
                            (dict(block_size=0), "block_size must be an integer >= 1"),
                            (dict(block_size=3.5), "block_size must be an integer >= 1"),
                            (dict(num_blocks=0), "num_blocks must be an integer >= 1 or None"),
                            (dict(max_seq_len=0), "max_seq_len must be an integer >= 1 or None"),
                            (dict(max_batch_size=True), "max_batch_size must be an integer"),
                            (dict(watermark=1.5), r"watermark .* must be in \[0, 1\)"),
                            (dict(watermark=-0.1), r"watermark .* must be in \[0, 1\)"),
                            (dict(cuda_graphs=True, graph_max_tokens=0), "graph_max_tokens must be an integer")]:
        with pytest.raises(ValueError, match=message):
            Engine(*tiny, **kwargs)


@pytest.mark.parametrize("overlap, keep_gathered", [(False, True), (True, True), (False, False)])
def test_engine_preempts_when_blocks_run_out_and_still_matches(tiny, reference, overlap, keep_gathered):
    model, tok = tiny
    engine = Engine(model, tok, overlap=overlap, max_batch_size=4, num_blocks=9, block_size=16,
                    keep_gathered=keep_gathered)
    out = engine.generate_many(PROMPTS * 2, max_new_tokens=48, ignore_eos=True)
    assert engine.scheduler.preemptions > 0
    assert sum(g.stats["preemptions"] for g in out) == engine.scheduler.preemptions
    assert [g.token_ids for g in out] == [reference[p] for p in PROMPTS * 2]
    assert engine.cache.manager.num_free == 9
    with pytest.raises(ValueError, match="num_blocks"):
        engine.submit("A", max_new_tokens=200)          # can never fit in 9 x 16 slots


def test_engine_sizes_its_default_cache_to_slots_not_to_a_long_context(tiny, reference):
    """A model with Llama 3.2's context (131,072 tokens) gets max_batch_size x 4,096 tokens of KV
    cache by default, not max_batch_size x 131,072; tiny's 2,048-token context keeps its full length
    per slot. A request that still fits runs as before; one that cannot is refused and told why."""
    import copy
    import dataclasses
    from llmopt.engine import SLOT_TOKENS
    model, tok = tiny
    assert Engine(model, tok, max_batch_size=8).cache.manager.num_blocks == 8 * 2048 // 16
    long = copy.deepcopy(model)
    long.config = dataclasses.replace(model.config, max_seq_len=131072)
    engine = Engine(long, tok, max_batch_size=8)
    assert engine.cache.manager.num_blocks == 8 * SLOT_TOKENS // 16 == 2048
    assert engine.cache.kv[0].shape[0] == 2048 * 16 and engine.max_seq_len == 131072
    assert engine.generate_many(PROMPTS[:2], max_new_tokens=48, ignore_eos=True)[1].token_ids == reference[PROMPTS[1]]
    with pytest.raises(ValueError, match="holds at most 32768 per sequence: .* more num_blocks"):
        engine.submit("A", max_new_tokens=40000)
    assert Engine(long, tok, max_batch_size=2, num_blocks=4096).cache.manager.num_blocks == 4096


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_sampling_is_per_request(tiny, overlap):
    model, tok = tiny
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.9)
    engine = Engine(model, tok, overlap=overlap, max_batch_size=3)
    out = engine.generate_many(PROMPTS[:3], seed=[5, 6, 7], **kw)
    for p, s, g in zip(PROMPTS, [5, 6, 7], out):
        assert g.token_ids == llmopt.generate(model, tok, p, seed=s, **kw).token_ids


def test_sixteen_clients_every_request_completes_identically(tiny):
    model, tok = tiny
    work = poisson_workload(tok, 48, rate=400.0, seed=1, prompt_tokens=(4, 24), output_tokens=(4, 24))
    with Engine(model, tok, max_batch_size=6, num_blocks=14) as engine:
        df = run_load(engine, work, clients=16, ignore_eos=True)
    assert len(df) == len(work) and df["ok"].all()
    for item, ids in zip(work, df["token_ids"]):
        assert ids == llmopt.generate(model, tok, item.prompt_ids, max_new_tokens=item.max_new_tokens,
                                      ignore_eos=True).token_ids
    summary = summarize_load(df, "engine", submitted=len(work))
    assert summary["lost"] == 0 and summary["failed"] == 0
    assert summary["e2e_p50_s"] <= summary["e2e_p95_s"] <= summary["e2e_p99_s"]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_or_cancelled_request_affects_no_other(tiny, reference, overlap):
    model, tok = tiny

    class FaultyEngine(Engine):
        def _hit_stop(self, seq):                  # a detokenizer fault in one request
            if "boom" in seq.stop and len(seq.generated) == 3:
                raise RuntimeError("detokenizer exploded")
            return super()._hit_stop(seq)

    with FaultyEngine(model, tok, overlap=overlap, max_batch_size=4) as engine:
        good = [engine.submit(p, max_new_tokens=30, ignore_eos=True) for p in PROMPTS[:3]]
        bad = engine.submit("KING:\nNow", max_new_tokens=30, stop=["boom"], ignore_eos=True)
        doomed = engine.submit(PROMPTS[4], max_new_tokens=48, ignore_eos=True)
        assert doomed.cancel()
        with pytest.raises(RuntimeError, match="exploded"):
            bad.result(timeout=60)
        with pytest.raises(CancelledError):
            doomed.result(timeout=60)
        assert [h.result(timeout=60).token_ids for h in good] == [reference[p][:30] for p in PROMPTS[:3]]
    assert engine.cache.manager.num_free == engine.cache.manager.num_blocks


@pytest.mark.parametrize("overlap, temperature", [(False, 0.0), (False, 0.8), (True, 0.8)])
def test_a_request_whose_logits_break_fails_alone(tiny, reference, overlap, temperature):
    """NaN logits in one row (fp16 overflow, say) fail that request with an error that says so, after a
    few tokens or at its first; the sampler never sees them (on a GPU it would assert and end the process)."""
    model, tok = tiny
    bad_ids = tok.encode(PROMPTS[1])

    class Overflowing(Engine):
        def _sample_and_launch(self, rows, logits):
            logits = logits.clone()
            for i, seq in enumerate(rows):
                if seq.prompt_ids == bad_ids and len(seq.generated) + seq.inflight == 3:
                    logits[i, 7] = float("nan")
            return super()._sample_and_launch(rows, logits)

    with Overflowing(model, tok, overlap=overlap, max_batch_size=4) as engine:
        handles = [engine.submit(p, max_new_tokens=24, ignore_eos=True, temperature=temperature, seed=i)
                   for i, p in enumerate(PROMPTS[:4])]
        with pytest.raises(FloatingPointError, match="logits were not finite .* at new token 4; .* bf16 or fp32"):
            handles[1].result(timeout=60)
        done = [handles[i].result(timeout=60) for i in (0, 2, 3)]
    assert all(len(g.token_ids) == 24 for g in done)
    if temperature == 0:
        assert [g.token_ids for g in done] == [reference[PROMPTS[i]][:24] for i in (0, 2, 3)]
    assert engine.cache.manager.num_free == engine.cache.manager.num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_batched_forward_shrinks_the_batch_and_loses_nothing(tiny, reference, overlap):
    """A transient fault in a batched forward (like CUDA out-of-memory) preempts half the batch."""
    model, tok = tiny
    calls = {"n": 0}

    class Flaky(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        device = property(lambda self: self.inner.device)
        dtype = property(lambda self: self.inner.dtype)

        def forward(self, ids, *a, **kw):
            if ids.shape[0] > 2 and calls["n"] < 3:
                calls["n"] += 1
                raise torch.OutOfMemoryError("simulated out of memory")
            return self.inner(ids, *a, **kw)

    engine = Engine(Flaky(model), tok, overlap=overlap, max_batch_size=4)
    out = engine.generate_many(PROMPTS[:4], max_new_tokens=20, ignore_eos=True)
    assert calls["n"] == 3 and engine.scheduler.preemptions >= 3
    assert [g.token_ids for g in out] == [reference[p][:20] for p in PROMPTS[:4]]


@pytest.mark.parametrize("overlap, prefix_caching", [(False, False), (True, False), (False, True)])
def test_a_failing_mixed_step_prefills_its_prompts_alone_and_loses_nothing(tiny, reference, overlap,
                                                                           prefix_caching):
    """A fault in a mixed step's forward puts its new prompts back in the queue (and drops the
    prefix-cache entries they registered, never computed); the next step prefills each in a
    forward of its own (where a fault would stay with its request)."""
    model, tok = tiny
    calls = {"n": 0, "alone": 0}
    prompts = PROMPTS[:4]
    if prefix_caching:     # a shared first block, registered by the first prompt of a failing step
        prompts = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind " + p
                   for p in prompts]
        reference = {p: llmopt.generate(model, tok, p, max_new_tokens=20, ignore_eos=True).token_ids
                     for p in prompts}

    class Flaky(Engine):
        def _forward_mixed(self, *args):
            if calls["n"] < 2:
                calls["n"] += 1
                raise RuntimeError("simulated fault in a mixed step")
            return super()._forward_mixed(*args)

        def _prefill(self, seq):
            calls["alone"] += 1
            super()._prefill(seq)

    engine = Flaky(model, tok, overlap=overlap, max_batch_size=2, prefix_caching=prefix_caching)
    out = engine.generate_many(prompts, max_new_tokens=20, ignore_eos=True)
    assert [g.token_ids for g in out] == [reference[p][:20] for p in prompts]
    # two prompts a step (two slots): both failing mixed steps' prompts ran alone after them
    assert calls == {"n": 2, "alone": 4} and engine.scheduler.preemptions == 4
    if prefix_caching:
        assert any(g.stats["cached_prompt_tokens"] for g in out)
        engine.prefix_cache.clear()
    assert engine.cache.manager.num_free == engine.cache.manager.num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_stream_stop_and_errors(tiny, overlap):
    model, tok = tiny
    with Engine(model, tok, overlap=overlap, max_batch_size=2) as engine:
        handle = engine.submit("ROMEO:", max_new_tokens=40, stop=["\n\n"])
        pieces = list(handle.stream(timeout=60))
        g = handle.result()
        assert "".join(pieces) == g.text
        assert g.text == llmopt.generate(model, tok, "ROMEO:", max_new_tokens=40, stop=["\n\n"]).text
        for kwargs, message in [(dict(prompt=""), "empty"), (dict(top_p=2.0), "top_p"),
                                (dict(max_new_tokens=0), "max_new_tokens")]:
            with pytest.raises(ValueError, match=message):
                engine.submit(kwargs.pop("prompt", "A"), **kwargs)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("A")
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, tok, overlap=overlap, max_batch_size=0)


def test_overlap_launches_the_next_step_before_reading_the_last(tiny, reference):
    """With overlap, step n+1 is launched from step n's tokens while they are still unread, and
    step n is read afterwards; rows that end on end-of-sequence mid-flight drop their extra token;
    every output equals the synchronous engine's."""
    model, tok = tiny
    events = []

    class Logged(Engine):
        def _forward_rows(self, rows, lengths, tokens):
            events.append("launch")
            return super()._forward_rows(rows, lengths, tokens)

        def _forward_mixed(self, rows, lengths, tokens, joining):      # the first step: prompts only
            events.append("launch")
            return super()._forward_mixed(rows, lengths, tokens, joining)

        def _read_back(self, launched):
            if launched is not None:
                events.append("read")
            super()._read_back(launched)

    engine = Logged(model, tok, max_batch_size=4, overlap=True)
    out = engine.generate_many(PROMPTS[:4], max_new_tokens=20, ignore_eos=True)
    assert [g.token_ids for g in out] == [reference[p][:20] for p in PROMPTS[:4]]
    assert events[:3] == ["launch", "launch", "read"]            # step 2 runs before step 1 is read
    assert events.count("launch") == events.count("read") and engine._inflight is None
    from conftest import EosAt
    eos_tok = EosAt(tok, reference[PROMPTS[0]][5])       # prompt 0's 6th token ends it
    runs = [Engine(model, eos_tok, max_batch_size=3, overlap=o) for o in (False, True)]
    sync, ahead = (e.generate_many(PROMPTS[:5], max_new_tokens=30) for e in runs)
    assert [g.token_ids for g in ahead] == [g.token_ids for g in sync]
    assert ahead[0].finish_reason == "eos" and len(ahead[0].token_ids) <= 6
    assert runs[1].tokens_generated == runs[0].tokens_generated
    assert all(e.cache.manager.num_free == e.cache.manager.num_blocks for e in runs)
    with pytest.raises(ValueError, match="overlap"):
        Engine(model, tok, overlap="yes")


# ---- the engine's CUDA graphs (on a CPU: the same padded steps, eagerly) ------------------------
def test_buckets_round_up_to_powers_of_two_within_their_cap():
    from llmopt.cuda_graphs import bucket
    assert [bucket(n, 16) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert [bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]
    assert bucket(100, 128) == 128 and bucket(129, 200) == 200


@pytest.mark.parametrize("overlap, mixed", [(False, True), (True, True), (False, False)])
def test_engine_graph_steps_equal_unbatched(tiny, reference, overlap, mixed):
    """Steps padded up to their bucket (rows, new tokens per row and key blocks rounded up to
    powers of two, padding writing into the scratch block) give every request its unbatched
    tokens; mixed steps go through buckets too; the scratch block is nobody's, so the pool's
    accounting is unchanged."""
    model, tok = tiny
    lengths = [48, 5, 33, 17, 48, 1, 40, 9, 26, 48, 12, 30]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    engine = Engine(model, tok, overlap=overlap, max_batch_size=4, block_size=4, mixed_steps=mixed,
                    cuda_graphs=True)
    out = engine.generate_many(prompts, max_new_tokens=lengths, ignore_eos=True)
    assert [g.token_ids for g in out] == [reference[p][:n] for p, n in zip(prompts, lengths)]
    g, cache = engine.graphs, engine.cache
    # every forward went through a bucket, but prompts prefilled alone (mixed_steps=False)
    alone = 0 if mixed else sum(s["prefills"] for s in engine.step_log)
    assert g.steps == engine.forwards - alone > 0
    assert g.replays == g.recorded == 0 and g.error is None      # a CPU records nothing
    rows, queries, _, every = map(set, zip(*g.buckets))
    assert every == {False}                          # no speculation: only the last position's logits
    assert rows == {1, 2, 4}                         # 3 rows pad to 4; the batch shrank at the end
    # decode steps add one token a row; mixed steps a prompt (1-21 tokens, padded to 32 at most)
    assert queries == ({1} if not mixed else {1, 4, 16, 32})
    assert {w for r, q, w, _ in g.buckets if q == 1} == {4, 8, 16}   # 4 to 15 blocks of 4 tokens, as rows grew
    assert sum(r["steps"] for r in g.table()) == g.steps
    assert cache.scratch_block == cache.manager.num_blocks and cache.pool_blocks == cache.manager.num_blocks + 1
    assert cache.manager.num_free == cache.manager.num_blocks
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        Engine(model, tok, cuda_graphs="yes")


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_graph_steps_sample_per_request_and_survive_preemption(tiny, reference, overlap):
    model, tok = tiny
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.9)
    engine = Engine(model, tok, overlap=overlap, max_batch_size=3, cuda_graphs=True)
    out = engine.generate_many(PROMPTS[:3], seed=[5, 6, 7], **kw)
    for p, s, g in zip(PROMPTS, [5, 6, 7], out):
        assert g.token_ids == llmopt.generate(model, tok, p, seed=s, **kw).token_ids
    tight = Engine(model, tok, overlap=overlap, max_batch_size=4, num_blocks=9, block_size=16, cuda_graphs=True)
    out = tight.generate_many(PROMPTS * 2, max_new_tokens=48, ignore_eos=True)
    assert tight.scheduler.preemptions > 0 and tight.graphs.steps > 0
    assert [g.token_ids for g in out] == [reference[p] for p in PROMPTS * 2]
    assert tight.cache.manager.num_free == 9
    # forked samples sharing prompt blocks (copy on write) and cached prefixes, through the buckets
    shared = Engine(model, tok, overlap=overlap, max_batch_size=4, prefix_caching=True, cuda_graphs=True)
    plain = Engine(model, tok, overlap=overlap, max_batch_size=4, prefix_caching=True)
    for e in (shared, plain):
        e.sample_n(PROMPTS[1], 3, seed=9, **kw)
    assert [g.token_ids for g in shared.sample_n(PROMPTS[1], 3, seed=9, **kw)] == \
        [g.token_ids for g in plain.sample_n(PROMPTS[1], 3, seed=9, **kw)]
    assert shared.forks > 0 and shared.prefix_cache.hit_tokens > 0 and shared.graphs.steps == shared.forwards


def test_engine_steps_over_the_graph_token_budget_run_eagerly(tiny, reference):
    model, tok = tiny
    engine = Engine(model, tok, max_batch_size=4, cuda_graphs=True, graph_max_tokens=16)
    # 4 rows x 4 tokens: the longer prompts' mixed steps run eagerly
    assert engine.graphs.fits(4, 4) and not engine.graphs.fits(3, 5) and engine.graphs.fits(1, 16)
    assert not engine.graphs.fits(1, 17) and not engine.graphs.fits(1, 2000)   # a prompt over the budget
    out = engine.generate_many(PROMPTS, max_new_tokens=24, ignore_eos=True)
    assert [g.token_ids for g in out] == [reference[p][:24] for p in PROMPTS]
    assert 0 < engine.graphs.steps < engine.forwards
    assert max(q for _, q, _, _ in engine.graphs.buckets) <= 16


class _FakeGraph:
    """Stands in for a recorded CUDA graph on a CPU: a replay runs the recorded function again,
    reading the buffers as they are now (what a real replay does)."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def test_the_record_and_replay_path_and_its_fallback_on_a_cpu(tiny, reference, monkeypatch):
    """The GPU-only branches, driven on a CPU: recording is faked (the warm-up runs, then a
    'replay' reruns the step on the refilled buffers), so the tokens show every input reaches
    the replay; a failed recording warns, returns the warm-up's logits (the step is not run a
    second time) and leaves the path eager."""
    import llmopt.cuda_graphs as cg
    model, tok = tiny
    calls = {"record": 0}

    def fake_record(fn, *, pool=None, stream=None):
        calls["record"] += 1
        return fn(), _FakeGraph(fn)

    monkeypatch.setattr(cg, "record_cuda_graph", fake_record)
    lengths = [48, 5, 33, 17, 48, 1, 40, 9, 26, 48, 12, 30]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    for overlap in (False, True):
        engine = Engine(model, tok, overlap=overlap, max_batch_size=4, cuda_graphs=True)
        engine.graphs.record = True
        out = engine.generate_many(prompts, max_new_tokens=lengths, ignore_eos=True)
        assert [g.token_ids for g in out] == [reference[p][:n] for p, n in zip(prompts, lengths)]
        g = engine.graphs
        assert g.recorded == len(g.buckets) and g.replays == g.steps - g.recorded > 0 and g.error is None
    from llmopt.batching import batch_step_graph
    from llmopt.generate import compiled_cache
    cache, release = compiled_cache(model, 2, 256)     # the cache and graph the next batch will take
    release()
    step = batch_step_graph(model, cache, 2)
    step.record = True
    batch = generate_batch(model, tok, PROMPTS[:2], max_new_tokens=30, ignore_eos=True, cuda_graphs=True)
    assert batch_step_graph(model, cache, 2) is step
    assert [g.token_ids for g in batch] == [reference[p][:30] for p in PROMPTS[:2]]
    assert step.graph is not None and step.replays == 28            # step 1 recorded, 2..29 replayed

    def failing_record(fn, *, pool=None, stream=None):
        calls["record"] += 1
        raise cg.GraphRecordingError("RuntimeError: capture refused", fn())

    monkeypatch.setattr(cg, "record_cuda_graph", failing_record)
    runs = {"n": 0}
    engine = Engine(model, tok, max_batch_size=4, cuda_graphs=True)
    engine.graphs.record = True
    counted = engine.graphs._run
    engine.graphs._run = lambda b: (runs.__setitem__("n", runs["n"] + 1), counted(b))[1]
    calls["record"] = 0
    with pytest.warns(RuntimeWarning, match="capture refused"):
        out = engine.generate_many(prompts, max_new_tokens=lengths, ignore_eos=True)
    assert [g.token_ids for g in out] == [reference[p][:n] for p, n in zip(prompts, lengths)]
    assert calls["record"] == 1 and "capture refused" in engine.graphs.error and engine.graphs.replays == 0
    assert runs["n"] == engine.graphs.steps                         # one run a step, the failed one too


def test_engine_graphs_need_a_scratch_block(tiny):
    from llmopt.cuda_graphs import EngineGraphs
    from llmopt.kv_cache import PagedKVCache
    model, _ = tiny
    cache = PagedKVCache(model.config, 2, 64, block_size=16)
    with pytest.raises(ValueError, match="scratch_block=True"):
        EngineGraphs(model, cache, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overlap", [False, True])
def test_engine_cuda_graphs_record_and_replay(overlap):
    """On a GPU: graphs are recorded per bucket and replayed, and every request still gets the
    tokens the engine gives without graphs (and plain greedy decoding)."""
    model, tok = llmopt.load_model("tiny", device="cuda", dtype="fp32")
    lengths = [48, 5, 33, 17, 48, 1, 40, 9, 26, 48, 12, 30]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    runs = [Engine(model, tok, overlap=overlap, max_batch_size=4, cuda_graphs=g) for g in (False, True)]
    eager, graphed = (e.generate_many(prompts, max_new_tokens=lengths, ignore_eos=True) for e in runs)
    g = runs[1].graphs
    assert g.error is None and g.recorded == len(g.buckets) > 0 and g.replays > g.recorded
    assert [x.token_ids for x in graphed] == [x.token_ids for x in eager]
    ref = [llmopt.generate(model, tok, p, max_new_tokens=n, ignore_eos=True).token_ids
           for p, n in zip(prompts, lengths)]
    assert [x.token_ids for x in graphed] == ref
    recorded, replays, steps = g.recorded, g.replays, g.steps
    again = runs[1].generate_many(prompts, max_new_tokens=lengths, ignore_eos=True)   # replays only
    assert [x.token_ids for x in again] == ref
    assert g.recorded == recorded and g.replays - replays == g.steps - steps > 0


def test_close_without_waiting_cancels_what_is_queued(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch_size=1)
    handles = [engine.submit(p, max_new_tokens=48, ignore_eos=True) for p in PROMPTS]
    engine.close(wait=False)
    outcomes = []
    for h in handles:
        try:
            h.result(timeout=30)
            outcomes.append("done")
        except CancelledError:
            outcomes.append("cancelled")
    assert "cancelled" in outcomes and len(outcomes) == len(PROMPTS)
    assert not engine._thread.is_alive()


# ---- workloads and the comparison ----------------------------------------------------------
def test_workload_is_seeded_and_in_range(tiny):
    _, tok = tiny
    a = poisson_workload(tok, 30, rate=10.0, seed=3, prompt_tokens=(5, 9), output_tokens=(8, 16))
    b = poisson_workload(tok, 30, rate=10.0, seed=3, prompt_tokens=(5, 9), output_tokens=(8, 16))
    assert [(w.arrival_s, w.prompt_ids, w.max_new_tokens) for w in a] == \
           [(w.arrival_s, w.prompt_ids, w.max_new_tokens) for w in b]
    assert all(5 <= len(w.prompt_ids) <= 9 and 8 <= w.max_new_tokens <= 16 for w in a)
    arrivals = [w.arrival_s for w in a]
    assert arrivals == sorted(arrivals) and 1.0 < arrivals[-1] < 10.0   # about 30 / 10 per s
    with pytest.raises(ValueError, match="rate"):
        poisson_workload(tok, 3, rate=0)
    with pytest.raises(ValueError, match="lengths must be one of"):
        poisson_workload(tok, 3, lengths="zipf")


def test_dialogue_workload_takes_its_lengths_from_the_plays(tiny):
    _, tok = tiny
    work = poisson_workload(tok, 200, seed=5, prompt_tokens=(8, 64), output_tokens=(1, 1000), lengths="corpus")
    assert work == poisson_workload(tok, 200, seed=5, prompt_tokens=(8, 64), output_tokens=(1, 1000),
                                    lengths="corpus")
    from llmopt.data import load_text
    text = load_text("test")
    for w in work[:20]:
        prompt = tok.decode(w.prompt_ids)
        speaker = prompt.rstrip("\n").rsplit("\n", 1)[-1]       # the prompt ends on a speaker's name line
        assert prompt.endswith(".\n") and speaker.isupper() and f"\n\n{speaker}\n" in text
        assert 8 <= len(w.prompt_ids) <= 64
    out = sorted(w.max_new_tokens for w in work)
    # long-tailed like the plays' speeches: most are short, the longest many times the median
    assert out[0] >= 1 and out[len(out) // 2] < 40 and out[-1] > 5 * out[len(out) // 2]
    clipped = poisson_workload(tok, 50, seed=5, output_tokens=(16, 32), lengths="corpus")
    assert all(16 <= w.max_new_tokens <= 32 for w in clipped)


def test_workload_from_your_own_text(tiny):
    """`text=`: prompts are spans of that text; too little of it, or "corpus" lengths on text
    without the plays' speeches, is an error that says what to change."""
    _, tok = tiny
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tok.encode(text)
    work = poisson_workload(tok, 20, seed=1, prompt_tokens=(8, 16), output_tokens=(4, 8), text=text)
    joined = " ".join(map(str, ids))
    assert all(8 <= len(w.prompt_ids) <= 16 and " ".join(map(str, w.prompt_ids)) in joined for w in work)
    assert work != poisson_workload(tok, 20, seed=1, prompt_tokens=(8, 16), output_tokens=(4, 8))
    with pytest.raises(ValueError, match="too few to cut prompts of up to 64"):
        poisson_workload(tok, 2, prompt_tokens=(8, 64), text="A short text.")
    with pytest.raises(ValueError, match="found no speeches"):
        poisson_workload(tok, 2, lengths="corpus", text=text)
    play = "Act one.\n\nHAMLET.\nTo be, or not to be.\n\nHORATIO.\nMy lord."
    turns = poisson_workload(tok, 5, lengths="corpus", prompt_tokens=(1, 64), output_tokens=(1, 64), text=play)
    assert {tok.decode(w.prompt_ids).rstrip("\n").rsplit("\n", 1)[-1] for w in turns} <= {"HAMLET.", "HORATIO."}
    with pytest.raises(ValueError, match="no speech in the text has the 60 tokens"):
        poisson_workload(tok, 2, lengths="corpus", prompt_tokens=(60, 64), text=play)


def test_compare_batching_tells_a_changed_token_from_a_tie(tiny, monkeypatch):
    """An engine that changes one request's last token (not a near-tie): that row is not same_greedy."""
    import dataclasses

    model, tok = tiny
    work = poisson_workload(tok, 4, seed=0, prompt_tokens=(4, 12), output_tokens=(4, 8))
    real = Engine.generate_many

    def one_token_off(self, *args, **kw):
        out = real(self, *args, **kw)
        g = out[0]
        with torch.no_grad():   # the least likely token where the last one was chosen
            worst = model(torch.tensor([g.prompt_ids + g.token_ids[:-1]]))[0, -1].argmin().item()
        out[0] = dataclasses.replace(g, token_ids=g.token_ids[:-1] + [worst])
        return out
    monkeypatch.setattr(Engine, "generate_many", one_token_off)
    rows = {r["label"]: r for r in compare_batching(model, tok, work, slots=2, repeats=1)}
    assert rows["static batching"]["same_greedy"] and rows["dynamic batching (length-aware)"]["same_greedy"]
    bad = rows["continuous batching"]
    assert not bad["identical"] and not bad["same_greedy"] and bad["tie_partings"] == 0


def test_compare_batching_rows_and_ideal(tiny):
    model, tok = tiny
    work = poisson_workload(tok, 8, seed=0, prompt_tokens=(4, 12), output_tokens=(2, 24))
    rows = compare_batching(model, tok, work, slots=4, overlap=True, gather_every_step=True, repeats=2)
    assert [r["label"] for r in rows][0] == "static batching"
    assert rows[4]["label"] == "continuous batching, overlapped"
    assert rows[5]["label"] == "continuous batching, gathering every step"
    assert rows[5]["forwards"] == rows[2]["forwards"]           # same schedule, only the cache differs
    assert all(r["identical"] and r["same_greedy"] and r["tie_partings"] == 0 for r in rows)
    assert all(r["throughput_vs_static_min"] <= r["throughput_vs_static"] <= r["throughput_vs_static_max"]
               for r in rows) and rows[0]["throughput_vs_static"] == 1.0
    ideal = ideal_continuous_speedup([w.max_new_tokens for w in work], 4)
    assert rows[0]["forwards"] == ideal["static_steps"]
    assert ideal["continuous_steps"] <= rows[2]["forwards"] <= ideal["static_steps"]
    assert rows[3]["label"] == "continuous batching, longest first"
    assert ideal["longest_first_steps"] <= rows[3]["forwards"] <= ideal["static_steps"]
    assert ideal_continuous_speedup([10] * 8, 4)["step_ratio"] == 1.0
    # first come: 5..8 join slots freed at 1..4 and end at 12; longest first: 8, 7, 6, 5 fill the
    # slots, then 4, 3, 2, 1 join the slots freed at 5, 6, 7, 8: all end at 9 = 36 tokens / 4 slots
    graphs = compare_batching(model, tok, work, slots=4, cuda_graphs=True, repeats=2)
    assert [r["label"] for r in graphs[4:]] == ["static batching, CUDA graphs",
                                                "continuous batching, CUDA graphs, overlapped",
                                                "continuous batching, longest first, CUDA graphs, overlapped"]
    assert graphs[4]["identical"] and graphs[4]["forwards"] == rows[0]["forwards"]
    assert graphs[4]["throughput_vs_static_graphs"] == 1.0 and "throughput_vs_static_graphs" not in graphs[2]
    # the same schedules as without graphs (overlapped), one engine kept over the repeats
    assert graphs[5]["forwards"] == rows[4]["forwards"] and rows[3]["forwards"] <= graphs[6]["forwards"] <= \
        rows[3]["forwards"] + 1
    for r in graphs[5:]:
        assert r["identical"] and r["graph_error"] is None
        assert r["graph_steps"] > 0 and r["graphs_recorded"] == r["graph_replays"] == 0    # a CPU records none
        assert r["first_wall_s"] > 0
        assert r["throughput_vs_static_graphs_min"] <= r["throughput_vs_static_graphs"] \
            <= r["throughput_vs_static_graphs_max"]
    lpt = ideal_continuous_speedup([1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert lpt["continuous_steps"] == 12 and lpt["longest_first_steps"] == 9 and lpt["static_steps"] == 12
    assert lpt["static_longest_first_steps"] == 12


def test_scheduler_longest_first_orders_new_requests_but_keeps_preempted_ones_first(tiny):
    from llmopt.engine import BlockManager, Scheduler, Sequence
    with pytest.raises(ValueError, match="policy must be one of"):
        Scheduler(BlockManager(8, 16), 2, policy="shortest")
    def seq(i, n):
        return Sequence(i, [1, 2, 3], max_new_tokens=n, temperature=0.0, top_k=None, top_p=None, seed=None,
                        stop=[], eos=set(), device="cpu")
    fcfs, lpt = Scheduler(BlockManager(64, 16), 2), Scheduler(BlockManager(64, 16), 2, policy="longest-first")
    for i, n in enumerate([5, 30, 10, 30, 1]):
        fcfs.add(seq(i, n))
        lpt.add(seq(i, n))
    assert [s.id for s in fcfs.waiting] == [0, 1, 2, 3, 4]
    assert [s.id for s in lpt.waiting] == [1, 3, 2, 0, 4]          # ties keep arrival order
    running = lpt.admit()
    assert [s.id for s in running] == [1, 3]
    lpt.preempt(running[1])                                        # back to the front, recomputed first
    lpt.add(seq(5, 99))
    assert [s.id for s in lpt.waiting][:2] == [3, 5]


def test_engine_longest_first_gives_each_caller_its_own_output(tiny, reference):
    model, tok = tiny
    budgets = [4, 20, 9, 14, 6]
    with llmopt.Engine(model, tok, max_batch_size=2, policy="longest-first") as engine:
        out = engine.generate_many(PROMPTS[:5], max_new_tokens=budgets, ignore_eos=True)
    for p, n, g in zip(PROMPTS[:5], budgets, out):
        assert g.token_ids == reference[p][:n]        # greedy: a prefix of the 48-token output


def test_static_server_serves_clients(tiny, reference):
    model, tok = tiny
    with static_server(model, tok, batch_size=3, max_wait_s=0.01) as server:
        futures = []
        threads = [threading.Thread(target=lambda p=p: futures.append(
            (p, server.submit(p, max_new_tokens=12, ignore_eos=True)))) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p, f in futures:
            assert f.result(timeout=60).token_ids == reference[p][:12]


def test_prometheus_metrics_count_what_happened(tiny):
    import urllib.request
    from llmopt.monitoring import EngineMetrics
    model, tok = tiny
    metrics = EngineMetrics()
    with Engine(model, tok, max_batch_size=2, metrics=metrics) as engine:
        handles = [engine.submit(p, max_new_tokens=8, ignore_eos=True) for p in PROMPTS[:4]]
        doomed = engine.submit("JULIET:", max_new_tokens=200, ignore_eos=True)
        doomed.cancel()
        outs = [h.result(timeout=60) for h in handles]
    snap = metrics.snapshot()
    assert snap["submitted"] == 5
    assert snap["requests_finished"] == 4 and snap["requests_cancelled"] == 1
    assert snap["tokens"] == engine.tokens_generated >= sum(len(g.token_ids) for g in outs)
    assert snap["time_to_first_token_seconds_count"] == 4 and snap["e2e_seconds_mean"] > 0
    assert snap["kv_blocks_used"] == 0 and snap["running"] == 0
    port = metrics.serve(port=0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    assert 'llmopt_requests_total{outcome="finished"} 4.0' in body
    assert "llmopt_time_to_first_token_seconds_bucket" in body


@pytest.mark.parametrize("overlap", [False, True])
def test_prefix_caching_shares_prompt_blocks_and_changes_no_sample(tiny, overlap):
    model, tok = tiny
    system = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
              "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. "
              "resolved.\n\n")
    prompts = [system + q for q in ("ROMEO:", "KING:\nNow", "JULIET:\nO Romeo")]
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=50)
    plain = Engine(model, tok, overlap=overlap, max_batch_size=3)
    shared = Engine(model, tok, overlap=overlap, max_batch_size=3, prefix_caching=True)
    a = plain.generate_many(prompts, seed=[1, 2, 3], **kw)
    b = shared.generate_many(prompts, seed=[1, 2, 3], **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    full = len(tok.encode(system)) // 16 * 16
    assert b[0].stats["cached_prompt_tokens"] == 0
    assert full >= 48
    assert all(g.stats["cached_prompt_tokens"] >= full - 16 for g in b[1:])   # the system prompt
    manager = shared.cache.manager
    # every sequence is done: only the cache's own references remain, one per cached block
    assert manager.num_blocks - manager.num_free == len(shared.prefix_cache.blocks)
    assert all(manager.refcount[blk] == 1 for blk in shared.prefix_cache.blocks.values())
    shared.prefix_cache.clear()
    assert manager.num_free == manager.num_blocks


def test_generate_n_samples_share_the_prompt(tiny):
    model, tok = tiny
    prompt = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    samples = llmopt.generate(model, tok, prompt, n=4, max_new_tokens=16, temperature=1.0, seed=10)
    assert len(samples) == 4 and len({tuple(g.token_ids) for g in samples}) > 1
    for i, g in enumerate(samples):       # sample i equals an unshared run seeded seed + i
        assert g.token_ids == llmopt.generate(model, tok, prompt, max_new_tokens=16, temperature=1.0,
                                              seed=10 + i).token_ids
    assert sum(g.stats["cached_prompt_tokens"] > 0 for g in samples) == 3
    with pytest.raises(ValueError, match="n \\(samples"):
        llmopt.generate(model, tok, prompt, n=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_prefix_cache_is_evicted_when_blocks_run_short(tiny, reference, overlap):
    model, tok = tiny
    engine = Engine(model, tok, overlap=overlap, max_batch_size=2, num_blocks=10, prefix_caching=True)
    out = engine.generate_many(PROMPTS * 2, max_new_tokens=48, ignore_eos=True)
    assert [g.token_ids for g in out] == [reference[p] for p in PROMPTS * 2]
    m = engine.cache.manager
    assert m.num_blocks - m.num_free == len(engine.prefix_cache.blocks) <= 10


def _unshared(model, tok, prompt, n, seed, **kw):
    return [llmopt.generate(model, tok, prompt, seed=seed + i, **kw).token_ids for i in range(n)]


# 21 tokens (a partly filled last block) and 32 (whole blocks)
@pytest.mark.parametrize("extra", ["", " in the mind to suffer\nThe slings and a"])
@pytest.mark.parametrize("overlap", [False, True])
def test_sample_n_forks_the_prompt_and_copies_on_write(tiny, extra, overlap):
    model, tok = tiny
    prompt = "To be, or not to be, that is the question:\nWhether 'tis nobler" + extra
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=40)
    engine = Engine(model, tok, overlap=overlap, max_batch_size=4)
    out = engine.sample_n(prompt, 4, seed=7, **kw)
    assert [g.token_ids for g in out] == _unshared(model, tok, prompt, 4, 7, **kw)
    assert engine.forks == 3
    P = len(tok.encode(prompt))
    # the first write lands in the prompt's last block when it is partly filled: every holder but
    # the last copies it; when the prompt fills whole blocks, each sample writes a block of its own
    assert engine.blocks_copied == (3 if P % 16 else 0)
    assert P in (21, 32)
    assert all(g.stats["cached_prompt_tokens"] == P for g in out[1:])
    m = engine.cache.manager
    assert m.num_free == m.num_blocks and not any(m.refcount)    # freed when the last user finished
    with pytest.raises(ValueError, match="n \\(samples"):
        engine.sample_n(prompt, 0)


def test_sample_n_saves_prefill_and_blocks(tiny):
    model, tok = tiny
    prompt = PROMPTS[5] * 6
    P = len(tok.encode(prompt))
    kw = dict(max_new_tokens=4, temperature=0.8, seed=3)
    forked, separate = Engine(model, tok, max_batch_size=4), Engine(model, tok, max_batch_size=4)
    a = forked.sample_n(prompt, 4, **kw)
    b = separate.generate_many([prompt] * 4, temperature=0.8, max_new_tokens=4, seed=[3, 4, 5, 6])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    peak = lambda e: max(s["blocks_used"] for s in e.step_log)          # noqa: E731
    per_seq = -(-(P + 4) // 16)
    assert peak(separate) == 4 * per_seq
    assert peak(forked) <= per_seq + 3 * (-(-(P + 4) // 16) - P // 16)  # the full prompt blocks once
    assert sum(s["prefills"] for s in forked.step_log) == 1


def test_sample_n_with_few_slots_and_few_blocks_still_matches(tiny):
    """Two slots for four samples (two fork, two wait and fork from a later prefill), and a pool
    so small that copy on write has to preempt: outputs are unchanged."""
    model, tok = tiny
    prompt = PROMPTS[1]
    kw = dict(max_new_tokens=60, temperature=1.0)
    engine = Engine(model, tok, max_batch_size=2, num_blocks=8)
    out = engine.sample_n(prompt, 4, seed=11, **kw)
    assert [g.token_ids for g in out] == _unshared(model, tok, prompt, 4, 11, **kw)
    assert engine.forks >= 1 and engine.scheduler.preemptions > 0
    m = engine.cache.manager
    assert m.num_free == m.num_blocks


def test_an_engine_cache_larger_than_the_free_gpu_memory_is_refused_naming_one_that_fits(tiny, monkeypatch):
    """On a GPU the default pool (slots x 4,096 tokens) can exceed what is free: a clear error with a
    num_blocks that fits, before anything is allocated (the device's free memory faked here)."""
    import llmopt.kv_cache
    model, tok = tiny
    per_block = 16 * llmopt.kv_cache.kv_bytes_per_token(model.config, model.dtype)
    monkeypatch.setattr(llmopt.kv_cache, "free_device_bytes", lambda device: 100 * per_block)
    with pytest.raises(ValueError, match=r"KV cache \(1,024 blocks of 16 tokens: .* GiB\) does not fit .* "
                                         r"pass num_blocks=89 \(1,424 tokens in all"):
        Engine(model, tok, max_batch_size=8)                       # 8 slots x 2,048 tokens
    with Engine(model, tok, max_batch_size=8, num_blocks=89) as engine:
        assert engine.generate_many(["ROMEO:"], max_new_tokens=4)[0].token_ids
    monkeypatch.setattr(llmopt.kv_cache, "free_device_bytes", lambda device: per_block)
    with pytest.raises(ValueError, match="free memory first"):
        Engine(model, tok, max_batch_size=1, num_blocks=2)
