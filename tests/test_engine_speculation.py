"""Speculative decoding inside the continuous-batching engine: each step's one forward verifies every row's drafts
(prompt lookup, an n-gram table, the MLP draft). Greedy output must equal plain decoding's under every engine option,
sampled output must follow the model's distribution, and rows that cannot speculate (penalties, logit bias,
log-probabilities) must be served as before beside the ones that do."""
import pytest
import torch

import llmopt
from llmopt.engine import Engine
from llmopt.speculative import NGramDraft, verify_drafts

PROMPTS = ["ROMEO:", "KING:\nNow", "JULIET:\nO Romeo, Romeo", "First Citizen:\nBefore we proceed any further",
           "HAMLET:", "MENENIUS:\nWhat", "To be, or not", "DUKE:"]


@pytest.fixture(scope="module")
def tiny():
    return llmopt.load_model("tiny")


@pytest.fixture(scope="module")
def mlp_draft():
    return llmopt.load_model("tiny-draft")[0]


@pytest.fixture(scope="module")
def reference(tiny):
    model, tok = tiny
    return [llmopt.generate(model, tok, p, max_new_tokens=40).token_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def llama_draft():
    return llmopt.load_model("tiny-draft-llama")[0]


@pytest.fixture(scope="module")
def ngram(tiny):
    from llmopt.data import load_split
    return NGramDraft.from_text(tiny[1], load_split("train")[0][:100_000])


@pytest.mark.parametrize("options", [
    dict(), dict(prefix_caching=True), dict(mixed_steps=False), dict(keep_gathered=False),
    dict(chunked_prefill=True, max_prefill_tokens=8), dict(num_blocks=12, max_batch_size=6),   # preemption
    dict(num_speculative_tokens=1), dict(num_speculative_tokens=8, max_batch_size=3),
    dict(cuda_graphs=True), dict(cuda_graphs=True, graph_max_tokens=16)],
    ids=["default", "prefix-caching", "separate-prefills", "gather-every-step", "chunked", "preemption",
         "k=1", "k=8", "cuda-graphs", "cuda-graphs-some-steps-eager"])
@pytest.mark.parametrize("kind", ["lookup", "mlp", "ngram", "transformer"])
def test_greedy_output_is_unchanged(tiny, mlp_draft, ngram, llama_draft, reference, kind, options):
    """Whatever the drafts, a greedy row keeps exactly the tokens plain decoding gives, and a step yields more than
    one token a row once drafts are accepted."""
    model, tok = tiny
    options = dict(dict(max_batch_size=4), **options)
    draft = dict(lookup="lookup", mlp=mlp_draft, ngram=ngram, transformer=llama_draft)[kind]
    with Engine(model, tok, speculative=draft, **options) as engine:
        outs = engine.generate_many(PROMPTS, max_new_tokens=40)
        assert [o.token_ids for o in outs] == reference
        assert engine.drafted > 0 and 0 < engine.draft_accepted <= engine.drafted
        assert sum(o.stats["accepted"] for o in outs) == engine.draft_accepted
        assert sum(o.stats["proposed"] for o in outs) == engine.drafted
        if "num_blocks" in options:
            assert engine.scheduler.preemptions > 0
        if "cuda_graphs" in options:      # on a CPU the padded graph steps run eagerly: the same path's logic
            verifying = [b for b in engine.graphs.table() if b["every_position"]]
            assert verifying and all(b["queries"] > 1 for b in verifying)
            if options.get("graph_max_tokens") == 16:          # the bigger steps ran outside the buckets
                assert engine.graphs.steps < engine.forwards
        if kind == "transformer":
            assert engine.draft_forwards > 0
        if kind == "mlp" and "num_blocks" not in options:
            # the trained draft agrees often: fewer forwards than one per token per batch
            assert engine.forwards < engine.tokens_generated / options["max_batch_size"]


@pytest.mark.parametrize("options", [dict(), dict(prefix_caching=True), dict(num_blocks=12, max_batch_size=6),
                                     dict(cuda_graphs=True), dict(chunked_prefill=True, max_prefill_tokens=8),
                                     dict(num_speculative_tokens=7, block_size=4), dict(mixed_steps=False),
                                     dict(keep_gathered=False)],
                         ids=["default", "prefix-caching", "preemption", "cuda-graphs", "chunked", "k=7-small-blocks",
                              "separate-prefills", "gather-every-step"])
def test_a_draft_transformer_keeps_its_own_cache_exactly(tiny, reference, options):
    """The target as its own draft: every greedy guess is accepted only if the draft's paged cache holds exactly
    the keys and values of the tokens before it (caught up after prefill, cut back after each verification,
    dropped on preemption, shared blocks copied on write), since the draft then computes what the target will."""
    model, tok = tiny
    system = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    prompts = PROMPTS[:5] + [system + p for p in ("ROMEO:", "KING:")]
    want = reference[:5] + [llmopt.generate(model, tok, p, max_new_tokens=40).token_ids for p in prompts[5:]]
    options = dict(dict(max_batch_size=4), **options)
    with Engine(model, tok, speculative=model, **options) as engine:
        outs = engine.generate_many(prompts, max_new_tokens=40)
        assert [o.token_ids for o in outs] == want
        assert engine.draft_accepted == engine.drafted > 0
        forks = engine.sample_n(PROMPTS[2], 3, max_new_tokens=30, temperature=1.0, top_k=1, seed=0)
        assert [f.token_ids for f in forks] == [reference[2][:30]] * 3
        assert engine.draft_accepted == engine.drafted
        if "num_blocks" in options:
            assert engine.scheduler.preemptions > 0
        if options.get("prefix_caching"):
            assert outs[-1].stats["cached_prompt_tokens"] > 0
    assert engine.forwards < engine.tokens_generated / 4


@pytest.mark.parametrize("options", [dict(), dict(num_blocks=12, max_batch_size=6), dict(prefix_caching=True)],
                         ids=["default", "preemption", "prefix-caching"])
def test_a_draft_transformers_guesses_are_its_own_greedy_continuation(tiny, llama_draft, options):
    """With a smaller draft that the target often overrules, every guess the engine's draft makes equals what the
    draft model alone, recomputing the whole sequence, would guess next: its cache is cut back to the accepted
    tokens after each verification, and rebuilt after a preemption."""
    model, tok = tiny
    guesses = []

    class Recorded(Engine):
        def _model_drafts(self, want):
            super()._model_drafts(want)
            guesses.extend((s.all_ids, s.draft) for s, _ in want if s.draft)

    with Recorded(model, tok, speculative=llama_draft, **dict(dict(max_batch_size=4), **options)) as engine:
        engine.generate_many(PROMPTS, max_new_tokens=40)
        assert engine.draft_rejected > 10
    assert len(guesses) > 50
    for ids, draft in guesses:
        assert draft == llmopt.generate(llama_draft, tok, ids, max_new_tokens=len(draft), ignore_eos=True).token_ids


def test_a_row_stops_where_plain_decoding_stops(tiny, mlp_draft):
    """Several accepted tokens in one step still end a row at its stop string, end of sequence or length."""
    model, tok = tiny
    asks = [dict(stop=["\n"]), dict(stop=["the"]), dict(max_new_tokens=3), dict(max_new_tokens=1), {}]
    ref = [llmopt.generate(model, tok, p, **dict(dict(max_new_tokens=30), **a)) for p, a in zip(PROMPTS, asks)]
    with Engine(model, tok, max_batch_size=5, speculative=mlp_draft) as engine:
        handles = [engine.submit(p, **dict(dict(max_new_tokens=30), **a)) for p, a in zip(PROMPTS, asks)]
        outs = [h.result() for h in handles]
    for got, want in zip(outs, ref):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    assert {o.finish_reason for o in outs} >= {"stop", "length"}


def test_rows_with_penalties_bias_or_logprobs_speculate_as_they_decode(tiny, mlp_draft):
    """Penalties and a logit bias apply at every verified position as plain decoding applies them there (each draft
    counted from the next position on), so those rows keep the tokens of a loop of full forwards with the penalties;
    rows asking for log-probabilities report the model's own at every kept token, as the engine without drafts does
    (greedy and sampled narrowed to one token)."""
    from test_penalties import penalized_greedy
    model, tok = tiny
    asks = [dict(repetition_penalty=1.3), {}, dict(logprobs=2), dict(logit_bias={5: -100}),
            dict(frequency_penalty=-0.6), dict(frequency_penalty=0.5, presence_penalty=0.5),
            dict(logprobs=0, temperature=1.0, top_k=1, seed=4)]
    prompts = PROMPTS[:len(asks)]
    with Engine(model, tok, max_batch_size=7) as plain:
        want = [h.result() for h in [plain.submit(p, max_new_tokens=30, ignore_eos=True, **a)
                                     for p, a in zip(prompts, asks)]]
    for ahead in (False, True):      # drafts from the MLP, and drafts that are the reference's own next tokens
        if ahead:
            refs = {tuple(w.prompt_ids): w.prompt_ids + w.token_ids for w in want}

            class Ahead:           # proposes what the penalized reference generates next: every draft accepted
                def propose(self, tokens, k):
                    ref = next(r for p, r in refs.items() if list(p) == tokens[:len(p)])
                    return ref[len(tokens):len(tokens) + k]
            draft = Ahead()
        else:
            draft = mlp_draft
        with Engine(model, tok, max_batch_size=7, speculative=draft) as engine:
            got = [h.result() for h in [engine.submit(p, max_new_tokens=30, ignore_eos=True, **a)
                                        for p, a in zip(prompts, asks)]]
        for g, w, a in zip(got, want, asks):
            assert g.token_ids == w.token_ids, (ahead, a)
            assert g.stats["accepted"] > 0, (ahead, a)
            if "logprobs" in a:
                assert len(g.logprobs) == len(g.top_logprobs) == len(g.token_ids)
                assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
                assert [[i for i, _ in t] for t in g.top_logprobs] == [[i for i, _ in t] for t in w.top_logprobs]
                assert [v for t in g.top_logprobs for _, v in t] == \
                    pytest.approx([v for t in w.top_logprobs for _, v in t], abs=1e-4)
        if ahead:
            assert engine.draft_accepted == engine.drafted
    for g, a in zip(want, asks):
        if any(k.endswith("penalty") for k in a):
            assert g.token_ids == penalized_greedy(model, g.prompt_ids, 30, **a)


def test_sampled_rows_narrowed_to_one_token_equal_greedy(tiny, mlp_draft, reference):
    """At temperature 1 with top_k=1 the distribution is the argmax's point mass: accepting a draft with
    probability p(d) and drawing the rest from p without d must then give the greedy tokens, forks included."""
    model, tok = tiny
    with Engine(model, tok, max_batch_size=4, speculative="lookup") as engine:
        outs = engine.generate_many(PROMPTS, max_new_tokens=40, temperature=1.0, top_k=1, seed=3)
        assert [o.token_ids for o in outs] == reference
        samples = engine.sample_n(PROMPTS[0], 3, max_new_tokens=40, temperature=0.7, top_p=1e-6, seed=1)
        assert [s.token_ids for s in samples] == [reference[0]] * 3
        assert engine.draft_accepted > 0


def test_seeded_samples_repeat(tiny, mlp_draft):
    model, tok = tiny
    runs = []
    for _ in range(2):
        with Engine(model, tok, max_batch_size=4, speculative=mlp_draft) as engine:
            runs.append([o.token_ids for o in engine.generate_many(PROMPTS[:6], max_new_tokens=30,
                                                                   temperature=0.9, seed=list(range(6)))])
            assert engine.draft_accepted > 0
    assert runs[0] == runs[1]


@pytest.mark.parametrize("q", [False, True])
def test_verification_samples_the_models_distribution(q):
    """Whatever the draft proposes (a proposer's token, q a point mass; or a draft model's sample from q), the
    first token kept follows p: the empirical distribution over 20,000 verifications is within 0.02 of p
    (total variation), and the second position's too when the first draft was accepted."""
    torch.manual_seed(0)
    V, n = 6, 20000
    logits = torch.randn(3, V) * 1.5
    p = logits.softmax(-1)
    qdist = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.1, 0.2, 0.5]])
    gen = torch.Generator().manual_seed(1)
    first = torch.zeros(V)
    second, after_accept = torch.zeros(V), 0
    for _ in range(n):
        if q:
            drafts = [int(torch.multinomial(qdist[i], 1, generator=gen)) for i in range(2)]
        else:
            drafts = [2, 4]
        out, n_ok = verify_drafts(logits, drafts, temperature=1.0, generator=gen, q=list(qdist) if q else None)
        assert 1 <= len(out) == n_ok + 1 <= 3 and out[:n_ok] == drafts[:n_ok]
        first[out[0]] += 1
        if n_ok >= 1:
            second[out[1]] += 1
            after_accept += 1
    assert 0.5 * (first / n - p[0]).abs().sum() < 0.02
    assert 0.5 * (second / after_accept - p[1]).abs().sum() < 0.04


def test_greedy_verification_keeps_the_agreeing_prefix():
    logits = torch.full((4, 5), -1.0)
    for i, t in enumerate([3, 1, 4, 0]):
        logits[i, t] = 1.0
    assert verify_drafts(logits, [3, 1, 2]) == ([3, 1, 4], 2)
    assert verify_drafts(logits, [3, 1, 4]) == ([3, 1, 4, 0], 3)
    assert verify_drafts(logits[:1], []) == ([3], 0)
    assert verify_drafts(logits, [0, 1, 4]) == ([3], 0)


def test_a_busy_engine_stops_speculating(tiny, mlp_draft, reference):
    """`speculative_max_batch=2`: no drafts in a step with more than two rows, drafts again once fewer run."""
    model, tok = tiny
    with Engine(model, tok, max_batch_size=4, speculative=mlp_draft, speculative_max_batch=2) as engine:
        outs = engine.generate_many(PROMPTS[:4], max_new_tokens=[10, 20, 30, 40])
        assert [o.token_ids for o in outs] == [r[:n] for r, n in zip(reference, (10, 20, 30, 40))]
        log = engine.step_log
        drafted = [(b["rows"], b["drafted"] - a["drafted"]) for a, b in zip(log, log[1:])]
        assert all(d == 0 for rows, d in drafted if rows > 2)
        assert sum(d for rows, d in drafted if rows <= 2) == engine.drafted > 0


def test_checkpoints_of_each_family_speculate_to_transformers_own_greedy_tokens(hf_checkpoint):
    """Llama, Qwen2 and Mistral checkpoints in the engine with prompt lookup: the greedy tokens of transformers'
    own generate (random weights repeat themselves, so lookup finds drafts and some are accepted)."""
    family, folder, hf_model = hf_checkpoint
    model, tok = llmopt.load_model(folder)
    prompts = [tok.encode(t) for t in ("Friends, Romans, countrymen", "Now is the winter", "To be, or not")]
    with Engine(model, tok, max_batch_size=3, speculative="lookup") as engine:
        outs = engine.generate_many(prompts, max_new_tokens=24, ignore_eos=True)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                     pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == want
    assert engine.draft_accepted > 0


def test_a_faulty_proposer_costs_drafts_not_requests(tiny, reference):
    """A proposer that raises, or proposes what is not a token id, never fails a request: the step runs without
    those drafts (a warning the first time) and every output is still plain greedy decoding's."""
    model, tok = tiny

    class Faulty:
        calls = 0

        def propose(self, tokens, k):
            Faulty.calls += 1
            if Faulty.calls % 5 == 0:
                raise RuntimeError("proposer bug")
            if Faulty.calls % 5 == 1:
                return [tokens[-1], 10**9, 3]                       # cut at the id past the vocabulary
            if Faulty.calls % 5 == 2:
                return [torch.tensor(tokens[-2]), "x"]              # a tensor scalar is an id; a string is not
            return tokens[-k:]

    with Engine(model, tok, max_batch_size=4, speculative=Faulty()) as engine:
        with pytest.warns(UserWarning, match="proposer failed .*RuntimeError: proposer bug"):
            outs = engine.generate_many(PROMPTS, max_new_tokens=40)
    assert [o.token_ids for o in outs] == reference
    assert engine.proposer_errors > 0 and engine.drafted > 0


def test_prometheus_counts_drafts(tiny, mlp_draft):
    from llmopt.monitoring import EngineMetrics
    model, tok = tiny
    metrics = EngineMetrics()
    with Engine(model, tok, max_batch_size=4, speculative=mlp_draft, metrics=metrics) as engine:
        engine.generate_many(PROMPTS[:4], max_new_tokens=24)
    snap = metrics.snapshot()
    assert snap["spec_draft_tokens"] == engine.drafted > snap["spec_accepted_tokens"] == engine.draft_accepted > 0
    assert snap["tokens"] == engine.tokens_generated


def test_speculation_by_batch_measures_sampling_too(tiny, mlp_draft):
    """Sampled (request i seeded i): no identity to check, fewer forwards a token with the draft all the same."""
    from llmopt.workload import speculation_by_batch
    model, tok = tiny
    row, = speculation_by_batch(model, tok, mlp_draft, sizes=(2,), max_new_tokens=32, repeats=1, temperature=0.8)
    assert row["identical"] is None and row["temperature"] == 0.8 and row["acceptance_rate"] > 0
    assert row["speculative_forwards_per_token"] < row["plain_forwards_per_token"] == 0.5


def test_bad_speculation_options_are_refused(tiny):
    model, tok = tiny
    import dataclasses
    other_vocab = llmopt.build_model(dataclasses.replace(llmopt.load_model("tiny-draft-llama")[0].config,
                                                         vocab_size=100))
    for kwargs, message in [
            (dict(speculative="medusa"), "'lookup'"),
            (dict(speculative=object()), "a smaller llmopt model with the same tokenizer"),
            (dict(speculative=other_vocab), r"the draft's vocabulary \(100\) differs from the model's \(4096\)"),
            (dict(speculative="lookup", overlap=True), "overlap=False"),
            (dict(speculative="lookup", num_speculative_tokens=0), "num_speculative_tokens"),
            (dict(speculative="lookup", speculative_max_batch=0), "speculative_max_batch")]:
        with pytest.raises(ValueError, match=message):
            Engine(model, tok, **kwargs)
    from llmopt.workload import speculation_by_batch
    for sizes in ((), (0, 4), (1.5,)):
        with pytest.raises(ValueError, match="sizes must be positive integers"):
            speculation_by_batch(model, tok, "lookup", sizes=sizes)
