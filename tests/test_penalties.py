"""Repetition penalties: OpenAI's presence and frequency penalties and transformers' repetition penalty, applied
by the engine (and generate, and the server) as a plain loop over full forwards applies them, under every engine
option; the repetition penalty as transformers' own generate does."""
import pytest
import torch

import llmopt
from llmopt.engine import Engine
from llmopt.sampling import apply_penalties

PROMPTS = ["ROMEO:", "KING:\nNow", "JULIET:\nO Romeo, Romeo", "First Citizen:\nBefore we proceed any further"]
ASKS = [dict(frequency_penalty=0.8), {}, dict(presence_penalty=1.5, repetition_penalty=1.3),
        dict(repetition_penalty=1.8, frequency_penalty=-0.5)]


@pytest.fixture(scope="module")
def tiny():
    return llmopt.load_model("tiny")


def penalized_greedy(model, prompt_ids: list[int], n: int, **penalties) -> list[int]:
    """The reference: a full forward over everything for each token, the penalties applied to its logits."""
    ids, out = list(prompt_ids), []
    vocab = model.config.vocab_size
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[torch.tensor(prompt_ids)] = True
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).float()
            out.append(int(apply_penalties(logits, counts, seen, **penalties).argmax()))
            ids.append(out[-1])
    return out


def test_penalties_follow_their_definitions():
    """OpenAI's: logit - frequency x count - presence x (count > 0), over the generated tokens; the repetition
    penalty divides a positive logit of any token seen (the prompt's too) and multiplies a negative one."""
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0])
    seen = torch.tensor([True, False, False, False, True])
    got = apply_penalties(logits, counts, seen, presence_penalty=0.5, frequency_penalty=0.25)
    assert got.tolist() == [2.0, -1.0 - 0.5 - 0.5, 0.5 - 0.25 - 0.5, 3.0, -2.0]       # the prompt's are untouched
    got = apply_penalties(logits, counts, seen, repetition_penalty=2.0)
    assert got.tolist() == [1.0, -2.0, 0.25, 3.0, -4.0]
    assert apply_penalties(logits, counts, None).tolist() == logits.tolist()


def test_penalties_of_many_rows_at_once_equal_each_rows_alone():
    """The engine's batched form, bit for bit, for rows with every mix of penalties (and none)."""
    from llmopt.sampling import apply_penalties_rows
    g = torch.Generator().manual_seed(0)
    asks = ASKS + [dict(repetition_penalty=0.7), dict(presence_penalty=-1.0)]
    logits = torch.randn(len(asks), 300, generator=g) * 4
    counts = torch.randint(0, 3, (len(asks), 300), generator=g).float()
    counts *= torch.rand(len(asks), 300, generator=g) < 0.1
    seen = torch.rand(len(asks), 300, generator=g) < 0.05
    params = torch.tensor([[a.get("presence_penalty", 0.0), a.get("frequency_penalty", 0.0),
                            a.get("repetition_penalty", 1.0)] for a in asks])
    got = apply_penalties_rows(logits, counts, seen, *params.unsqueeze(-1).unbind(1))
    for i, ask in enumerate(asks):
        assert torch.equal(got[i], apply_penalties(logits[i], counts[i], seen[i], **ask))


def test_the_repetition_penalty_is_transformers_own(hf_checkpoint):
    """Against transformers' RepetitionPenaltyLogitsProcessor, and greedy generation against its generate."""
    from transformers import RepetitionPenaltyLogitsProcessor
    family, folder, hf_model = hf_checkpoint
    scores = torch.randn(1, 512, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[5, 9, 9, 300, 17]])
    seen = torch.zeros(512, dtype=torch.bool)
    seen[input_ids[0]] = True
    want = RepetitionPenaltyLogitsProcessor(1.4)(input_ids, scores.clone())[0]
    torch.testing.assert_close(apply_penalties(scores[0], torch.zeros(512), seen, repetition_penalty=1.4), want)
    model, tok = llmopt.load_model(folder)
    prompt = tok.encode("Friends, Romans, countrymen")
    ours = llmopt.generate(model, tok, prompt, max_new_tokens=24, repetition_penalty=4.0, ignore_eos=True)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                   repetition_penalty=4.0, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours.token_ids == theirs
    assert ours.token_ids != llmopt.generate(model, tok, prompt, max_new_tokens=24, ignore_eos=True).token_ids


@pytest.mark.parametrize("options", [{}, dict(overlap=True), dict(num_blocks=5, watermark=0),
                                     dict(chunked_prefill=True, max_prefill_tokens=8), dict(mixed_steps=False),
                                     dict(cuda_graphs=True)])
def test_engine_penalties_equal_the_reference_under_every_option(tiny, options):
    """Four requests at once, each with other penalties (one with none), and a fifth after them; num_blocks=5
    preempts and recomputes, rebuilding a row's counts from its tokens."""
    model, tok = tiny
    with Engine(model, tok, max_batch_size=4, **options) as engine:
        # a fifth request waits for a slot, then takes over a finished one's row of token counts; its negative
        # frequency penalty makes it repeat tokens, so every count past the first matters
        asks = ASKS + [dict(frequency_penalty=-0.6)]
        handles = [engine.submit(p, max_new_tokens=20, ignore_eos=True, **ask)
                   for p, ask in zip(PROMPTS + ["HAMLET:"], asks)]
        gens = [h.result(timeout=120) for h in handles]
    if options.get("num_blocks"):
        assert engine.scheduler.preemptions > 0
    assert max(gens[4].token_ids.count(t) for t in gens[4].token_ids) > 3
    for g, ask in zip(gens, asks):
        assert g.token_ids == penalized_greedy(model, g.prompt_ids, 20, **ask), ask
    assert gens[0].token_ids != llmopt.generate(model, tok, PROMPTS[0], max_new_tokens=20, ignore_eos=True).token_ids


def test_sampled_rows_with_penalties_are_the_same_overlapped(tiny):
    """Overlapped, a step is launched before the host reads the last token: the counts it needs were updated on
    the device, so seeded samples are those of the synchronous engine."""
    model, tok = tiny
    outs = {}
    for overlap in (False, True):
        with Engine(model, tok, max_batch_size=4, overlap=overlap) as engine:
            outs[overlap] = [g.token_ids for g in engine.generate_many(
                PROMPTS, max_new_tokens=24, temperature=0.9, seed=7, presence_penalty=1.0, frequency_penalty=0.5)]
    assert outs[True] == outs[False]


def test_logprobs_stay_the_models_own_under_penalties(tiny):
    model, tok = tiny
    g = llmopt.generate(model, tok, PROMPTS[1], max_new_tokens=10, logprobs=1, frequency_penalty=2.0)
    with torch.inference_mode():
        ref = model(torch.tensor([g.prompt_ids + g.token_ids]))[0].float().log_softmax(-1)
    p = len(g.prompt_ids)
    assert g.logprobs == pytest.approx([ref[p - 1 + t, tok_].item() for t, tok_ in enumerate(g.token_ids)], abs=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty="1"), "frequency_penalty must be a number"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
    (dict(repetition_penalty=True), "got True")])
def test_bad_penalties_are_refused(tiny, bad, message):
    model, tok = tiny
    with pytest.raises(ValueError, match=message):
        llmopt.generate(model, tok, "ROMEO:", **bad)
    with Engine(model, tok, max_batch_size=1) as engine, pytest.raises(ValueError, match=message):
        engine.submit("ROMEO:", **bad)


def test_logit_bias_bans_and_forces_tokens(tiny):
    """-100 bans a token greedy would take, +100 all but forces one; equal to the reference loop with the bias
    added; through generate, the engine under overlap and with penalties beside it."""
    model, tok = tiny
    plain = llmopt.generate(model, tok, PROMPTS[1], max_new_tokens=16, ignore_eos=True).token_ids
    banned = plain[2]
    g = llmopt.generate(model, tok, PROMPTS[1], max_new_tokens=16, ignore_eos=True, logit_bias={banned: -100})
    assert banned not in g.token_ids and g.token_ids[:2] == plain[:2]
    forced = tok.encode(" Marry")[-1]
    with Engine(model, tok, max_batch_size=4, overlap=True) as engine:
        forced_g = engine.generate_many([PROMPTS[1]], max_new_tokens=6, ignore_eos=True,
                                        logit_bias={str(forced): 100})[0]          # (JSON's keys are strings)
    assert forced_g.token_ids == [forced] * 6
    with Engine(model, tok, max_batch_size=2) as engine:
        mixed = engine.submit(PROMPTS[2], max_new_tokens=12, ignore_eos=True, logit_bias={banned: -100, forced: 3.5},
                              frequency_penalty=0.7).result(timeout=60)
    ids, out = tok.encode(PROMPTS[2]), []
    with torch.inference_mode():
        for _ in range(12):
            logits = model(torch.tensor([ids + out]))[0, -1]
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=model.config.vocab_size).float()
            logits = apply_penalties(logits, counts, None, frequency_penalty=0.7)
            logits[banned] -= 100
            logits[forced] += 3.5
            out.append(int(logits.argmax()))
    assert mixed.token_ids == out


@pytest.mark.parametrize("bias, message", [([1, 2], "logit_bias must be a dict"), ({"x": 1}, "keys are token ids"),
                                           ({5.0: 1}, "keys are token ids"),
                                           ({99999: 1}, "outside the vocabulary"), ({5: 101}, r"in \[-100, 100\]")])
def test_bad_logit_bias_is_refused(tiny, bias, message):
    model, tok = tiny
    with pytest.raises(ValueError, match=message):
        llmopt.generate(model, tok, "ROMEO:", logit_bias=bias)
