"""Log-probabilities from the engine: each one equals log_softmax of a full forward over the whole text
(and of transformers' own logits), whatever the engine's batching, caching and chunking did."""
import pytest
import torch

import llmopt
from llmopt.engine import MAX_LOGPROBS, Engine

PROMPTS = ["ROMEO:", "To be, or not to be, that is the question:\nWhether 'tis nobler",
           "KING:\nNow", "A", "JULIET:\nO Romeo, Romeo", "First Citizen:\nBefore we proceed any further"]
# per prompt: (logprobs, prompt_logprobs, temperature): greedy and sampled, with and without alternatives
ASKS = [(3, True, 0.0), (None, False, 0.0), (0, False, 0.8), (5, True, 0.8), (MAX_LOGPROBS, False, 0.0), (1, True, 0.0)]


@pytest.fixture(scope="module")
def tiny():
    return llmopt.load_model("tiny")


def full_logprobs(model, ids) -> torch.Tensor:
    """log_softmax of one uncached forward over `ids`: row i is the distribution of token i + 1."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def check_against(ref: torch.Tensor, g, logprobs, prompt_logprobs, atol=1e-4):
    """`g`'s log-probabilities against `ref`, the full forward's log_softmax over its prompt and tokens."""
    p = len(g.prompt_ids)
    if logprobs is None:
        assert g.logprobs is None and g.top_logprobs is None
    else:
        assert len(g.logprobs) == len(g.top_logprobs) == len(g.token_ids)
        for t, tok in enumerate(g.token_ids):
            row = ref[p - 1 + t]
            assert g.logprobs[t] == pytest.approx(row[tok].item(), abs=atol)
            top = row.topk(logprobs)
            assert [i for i, _ in g.top_logprobs[t]] == top.indices.tolist()
            assert [v for _, v in g.top_logprobs[t]] == pytest.approx(top.values.tolist(), abs=atol)
    if not prompt_logprobs:
        assert g.prompt_logprobs is None
        return
    assert len(g.prompt_logprobs) == p and g.prompt_logprobs[0] is None
    want = ref[torch.arange(p - 1), torch.tensor(g.prompt_ids[1:], dtype=torch.long)].tolist()
    assert g.prompt_logprobs[1:] == pytest.approx(want, abs=atol)
    if logprobs:
        assert g.prompt_top_logprobs[0] is None
        assert [[i for i, _ in top] for top in g.prompt_top_logprobs[1:]] == \
            ref[:p - 1].topk(logprobs).indices.tolist()
    else:
        assert g.prompt_top_logprobs is None


@pytest.mark.parametrize("options", [{}, dict(prefix_caching=True), dict(overlap=True), dict(mixed_steps=False),
                                     dict(chunked_prefill=True, max_prefill_tokens=8),
                                     dict(num_blocks=8, watermark=0), dict(cuda_graphs=True)])
def test_engine_logprobs_equal_a_full_forward(tiny, options):
    """Six requests at once, each asking for something else; num_blocks=8 preempts and recomputes."""
    model, tok = tiny
    with Engine(model, tok, max_batch_size=4, **options) as engine:
        handles = [engine.submit(p, max_new_tokens=20, logprobs=lp, prompt_logprobs=plp, temperature=t, seed=i,
                                 ignore_eos=True)
                   for i, (p, (lp, plp, t)) in enumerate(zip(PROMPTS, ASKS))]
        gens = [h.result(timeout=120) for h in handles]
    if options.get("num_blocks"):
        assert engine.scheduler.preemptions > 0
    for g, (lp, plp, t) in zip(gens, ASKS):
        check_against(full_logprobs(model, g.prompt_ids + g.token_ids), g, lp, plp)
        if lp and t == 0:
            assert [top[0][0] for top in g.top_logprobs] == g.token_ids      # greedy takes the most likely


def test_prompt_logprobs_are_computed_even_when_the_prefix_cache_holds_the_prompt(tiny):
    model, tok = tiny
    prompt = PROMPTS[5] * 3                                   # several full blocks
    with Engine(model, tok, max_batch_size=2, prefix_caching=True) as engine:
        engine.generate_many([prompt], max_new_tokens=2)      # its blocks are now cached
        g = engine.generate_many([prompt], max_new_tokens=4, logprobs=2, prompt_logprobs=True)[0]
        again = engine.generate_many([prompt], max_new_tokens=4)[0]
    assert g.stats["cached_prompt_tokens"] == 0 and again.stats["cached_prompt_tokens"] > 0
    check_against(full_logprobs(model, g.prompt_ids + g.token_ids), g, 2, True)


def test_samples_of_one_prompt_share_its_prompt_logprobs(tiny):
    model, tok = tiny
    with Engine(model, tok, max_batch_size=4) as engine:
        gens = engine.sample_n(PROMPTS[4], 3, seed=0, temperature=1.0, max_new_tokens=8, logprobs=1,
                               prompt_logprobs=True)
    assert engine.forks == 2
    for g in gens:
        check_against(full_logprobs(model, g.prompt_ids + g.token_ids), g, 1, True)


def test_streamed_pieces_carry_the_tokens_and_logprobs_of_the_whole(tiny):
    """Pieces join to the Generation's text, ids and log-probabilities: with a stop string (tokens past it
    come in a last piece without text) and without."""
    model, tok = tiny
    with Engine(model, tok, max_batch_size=2) as engine:
        for stop, k in ((None, 2), ("e", 0)):
            handle = engine.submit(PROMPTS[0], max_new_tokens=30, logprobs=k, stop=stop)
            pieces = list(handle.pieces(timeout=60))
            g = handle.result()
            assert "".join(p.text for p in pieces) == g.text
            assert [t for p in pieces for t in p.token_ids] == g.token_ids
            assert [x for p in pieces for x in p.logprobs] == g.logprobs
            assert [x for p in pieces for x in p.top_logprobs] == g.top_logprobs
            assert all(len(p.logprobs) == len(p.token_ids) for p in pieces)
        assert g.finish_reason == "stop"
        plain = engine.submit(PROMPTS[0], max_new_tokens=5)
        assert all(p.logprobs is None and p.top_logprobs is None for p in plain.pieces(timeout=60))


def test_logprobs_match_transformers(hf_checkpoint):
    """On a transformers checkpoint: the engine's log-probabilities are log_softmax of transformers' own logits."""
    family, folder, hf_model = hf_checkpoint
    model, tok = llmopt.load_model(folder)
    with Engine(model, tok, max_batch_size=2) as engine:
        g = engine.generate_many(["Friends, Romans, countrymen"], max_new_tokens=12, logprobs=4,
                                 prompt_logprobs=True, ignore_eos=True)[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([g.prompt_ids + g.token_ids])).logits[0].float().log_softmax(-1)
    check_against(ref, g, 4, True, atol=1e-4)


@pytest.mark.parametrize("bad, message", [(dict(logprobs=-1), "logprobs must be None or an integer from 0"),
                                          (dict(logprobs=MAX_LOGPROBS + 1), f"to {MAX_LOGPROBS}"),
                                          (dict(logprobs=True), "got True"),
                                          (dict(logprobs=2.0), "got 2.0"),
                                          (dict(prompt_logprobs="yes"), "prompt_logprobs must be True or False")])
def test_bad_logprobs_are_refused_at_submit(tiny, bad, message):
    model, tok = tiny
    with Engine(model, tok, max_batch_size=2) as engine:
        with pytest.raises(ValueError, match=message):
            engine.submit("ROMEO:", **bad)
        assert engine.submit("ROMEO:", max_new_tokens=3).result(timeout=60).token_ids   # the engine still serves


def test_generate_reports_logprobs_through_the_engine(tiny):
    """generate(..., logprobs=k) gives the same tokens as without, with their log-probabilities; n samples too."""
    model, tok = tiny
    plain = llmopt.generate(model, tok, PROMPTS[2], max_new_tokens=12)
    g = llmopt.generate(model, tok, PROMPTS[2], max_new_tokens=12, logprobs=2, prompt_logprobs=True)
    assert g.token_ids == plain.token_ids and g.text == plain.text
    check_against(full_logprobs(model, g.prompt_ids + g.token_ids), g, 2, True)
    samples = llmopt.generate(model, tok, PROMPTS[2], max_new_tokens=6, n=2, seed=3, temperature=1.0, logprobs=0)
    for s in samples:
        check_against(full_logprobs(model, s.prompt_ids + s.token_ids), s, 0, False)
    with pytest.raises(ValueError, match="logprobs and prompt_logprobs run on the engine's paged cache"):
        llmopt.generate(model, tok, PROMPTS[2], logprobs=1, compile=True)
    with pytest.raises(ValueError, match="stream does not take logprobs, frequency_penalty: they run on the engine"):
        llmopt.stream(model, tok, PROMPTS[2], logprobs=1, frequency_penalty=0.5)
