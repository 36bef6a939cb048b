"""Speculative decoding: greedy output is the target's own, sampling keeps the target's distribution."""

import pytest
import torch

import llmopt
from llmopt.speculative import (NGramDraft, PromptLookup, expected_speedup, expected_tokens_per_round,
                                lookup_draft, speculation_vs_batch, speculative_generate, stops_paying_at)

PROMPTS = ["ROMEO:\nBut soft, what light through yonder window breaks?\n", "KING:\nNow", "A"]


@pytest.fixture(scope="module")
def pair():
    """The target and the transformer draft (its own KV cache)."""
    target, tok = llmopt.load_model("tiny")
    draft, _ = llmopt.load_model("tiny-draft-llama")
    return target, draft, tok


@pytest.fixture(scope="module")
def mlp_draft():
    return llmopt.load_model("tiny-draft")[0]


@pytest.fixture(scope="module")
def ngram(pair):
    from llmopt.data import load_text
    return NGramDraft.from_text(pair[2], load_text("train")[:300_000])


@pytest.mark.parametrize("draft_kind", ["model", "mlp", "lookup", "ngram", "lookup+ngram"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_is_the_targets_own(pair, mlp_draft, ngram, draft_kind, k):
    target, draft, tok = pair
    d = {"model": draft, "mlp": mlp_draft, "lookup": "lookup", "ngram": ngram,
         "lookup+ngram": PromptLookup(fallback=ngram)}[draft_kind]
    for prompt in PROMPTS:
        ref = llmopt.generate(target, tok, prompt, max_new_tokens=60, ignore_eos=True)
        g = speculative_generate(target, d, tok, prompt, k=k, max_new_tokens=60, ignore_eos=True)
        assert g.token_ids == ref.token_ids, (draft_kind, k, prompt)
        s = g.stats
        assert 0 <= s["accepted"] <= s["proposed"] <= k * s["rounds"]
        assert s["rejected"] <= s["rounds"] and s["accepted"] + s["rejected"] <= s["proposed"]
        if s["accepted"] + s["rejected"]:
            assert s["acceptance_rate"] == s["accepted"] / (s["accepted"] + s["rejected"])
        # every round yields the accepted drafts plus one token of the target's
        assert s["accepted"] + s["rounds"] + 1 >= len(g.token_ids) >= s["rounds"]
        assert s["target_forwards"] == s["rounds"] + 1
        assert s["tokens_per_target_forward"] == pytest.approx(len(g.token_ids) / s["target_forwards"])


def test_acceptance_rate_counts_only_checked_drafts(pair):
    """A draft right once then wrong: each round checks 2 of its 4 tokens (the rest are never
    checked), so the acceptance rate is 1/2, not 1/4, and the formula's E(1/2, 4) is near 2."""
    target, _, tok = pair
    ref = llmopt.generate(target, tok, PROMPTS[1], max_new_tokens=41, ignore_eos=True)
    n_prompt = len(ref.prompt_ids)

    class RightThenWrong:
        def propose(self, tokens, k):
            i = len(tokens) - n_prompt
            good = ref.token_ids[i:i + 2]
            return [good[0]] + [(good[-1] + 1) % 4096] * (k - 1) if len(good) == 2 else []

    g = speculative_generate(target, RightThenWrong(), tok, PROMPTS[1], k=4, max_new_tokens=40, ignore_eos=True)
    s = g.stats
    assert g.token_ids == ref.token_ids[:40]
    # every round but the last (whose budget may be 1 token, accepted) is one accepted, one rejected
    assert s["rejected"] in (s["accepted"], s["accepted"] - 1) and s["acceptance_rate"] == pytest.approx(0.5, abs=0.02)
    assert s["proposed"] > 3.5 * s["accepted"] and s["tokens_per_target_forward"] > 1.9


def test_model_draft_gives_several_tokens_per_target_forward(pair):
    target, draft, tok = pair
    g = speculative_generate(target, draft, tok, PROMPTS[0], k=4, max_new_tokens=96, ignore_eos=True)
    assert g.stats["tokens_per_target_forward"] > 1.5
    assert g.stats["draft_forwards"] >= g.stats["rounds"]
    assert g.stats["expected_tokens_per_round"] == pytest.approx(
        expected_tokens_per_round(g.stats["acceptance_rate"], 4))


def test_mlp_draft_gives_several_tokens_per_target_forward(pair, mlp_draft):
    """tiny-draft is distilled from tiny: on the target's greedy text it is accepted often."""
    target, _, tok = pair
    g = speculative_generate(target, mlp_draft, tok, PROMPTS[0], k=4, max_new_tokens=96, ignore_eos=True)
    assert g.stats["tokens_per_target_forward"] > 1.7
    assert g.stats["draft_forwards"] == g.stats["proposed"] and g.stats["draft"] == "tiny-draft"
    # an untrained draft of the same shape is almost never accepted: the agreement is learned
    from llmopt.draft import MLPDraft
    torch.manual_seed(0)
    untrained = MLPDraft(mlp_draft.config).eval()
    u = speculative_generate(target, untrained, tok, PROMPTS[0], k=4, max_new_tokens=96, ignore_eos=True)
    assert u.stats["acceptance_rate"] < 0.05 < g.stats["acceptance_rate"] - 0.2
    assert u.token_ids == g.token_ids


def test_greedy_matches_on_a_transformers_checkpoint(small_tokenizer_dir, tmp_path):
    """A random Qwen2 target with a random Llama draft of the same vocabulary."""
    from conftest import make_hf_checkpoint
    make_hf_checkpoint("qwen2", tmp_path / "t", small_tokenizer_dir, seed=1)
    make_hf_checkpoint("llama", tmp_path / "d", small_tokenizer_dir, seed=2)
    target, tok = llmopt.load_model(tmp_path / "t")
    draft, _ = llmopt.load_model(tmp_path / "d")
    ids = torch.randint(1, 512, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = llmopt.generate(target, None, ids, max_new_tokens=30, ignore_eos=True)
    for d in (draft, "lookup"):
        assert speculative_generate(target, d, None, ids, k=3, max_new_tokens=30,
                                    ignore_eos=True).token_ids == ref.token_ids


def _exact_joint(model, prompt, temperature):
    """P(t1, t2 | prompt) for every pair, by enumeration: [V, V]."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1] / temperature, -1)
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        p2 = torch.softmax(model(seqs)[:, -1] / temperature, -1)      # [V, V]
    return p1[:, None] * p2


@pytest.mark.parametrize("draft_kind", ["model", "table", "mlp"])
def test_sampling_keeps_the_target_distribution(draft_kind):
    """Rejection sampling: the (t1, t2) frequencies match the target's exact joint distribution,
    though the draft's own distribution is far from it."""
    cfg = llmopt.ModelConfig(vocab_size=6, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                             intermediate_size=64, max_seq_len=32)
    target = llmopt.build_model(cfg, seed=1)
    draft = llmopt.build_model(cfg, seed=2)
    with torch.no_grad():            # sharpen both so they disagree strongly
        target.lm_head.weight.mul_(60)
        draft.lm_head.weight.mul_(60)
    prompt, T = [1, 2, 3], 1.0
    exact = _exact_joint(target, prompt, T)
    wrong = _exact_joint(draft, prompt, T)
    assert 0.5 * (exact - wrong).abs().sum() > 0.2          # the draft alone would fail this test
    if draft_kind == "mlp":              # a random MLP draft: greedy proposals, far from the target
        from llmopt.draft import MLPDraft, MLPDraftConfig
        torch.manual_seed(3)
        d = MLPDraft(MLPDraftConfig(vocab_size=6, context=2, embed_dim=4, hidden_dim=8, out_dim=4)).eval()
    else:
        d = draft if draft_kind == "model" else NGramDraft({}, {t: (t + 1) % 6 for t in range(6)})
    n = 3000
    counts = torch.zeros(6, 6)
    for seed in range(n):
        g = speculative_generate(target, d, None, prompt, k=2, max_new_tokens=2, temperature=T,
                                 seed=seed, ignore_eos=True)
        counts[g.token_ids[0], g.token_ids[1]] += 1
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.05, f"total variation {tv:.3f} from the target's distribution"


def _lookup_by_definition(tokens, k, max_ngram=3, min_ngram=1):
    """Prompt lookup as its docstring defines it: for n from the longest down, the latest earlier place where
    the last n tokens occur, and the up to k tokens after it."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[len(tokens) - n:]:
                return tokens[start + n:start + n + k]
    return []


def test_lookup_and_ngram_proposals():
    assert lookup_draft([5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]
    assert lookup_draft([1, 2, 3], 2) == []
    assert lookup_draft([4, 1, 2, 9, 2, 7, 1, 2], 2) == [9, 2]       # the 2-gram beats a later 1-gram match
    import random
    rng = random.Random(0)
    for _ in range(5000):     # small vocabularies: many partial matches, ties of length, k past the end
        toks = [rng.randrange(rng.choice([2, 3, 5, 20])) for _ in range(rng.randint(0, 50))]
        k, top = rng.randint(0, 5), rng.randint(1, 4)
        low = rng.randint(1, top)
        assert lookup_draft(toks, k, top, low) == (_lookup_by_definition(toks, k, top, low) if k else [])
    table = NGramDraft.from_ids([1, 2, 3, 1, 2, 3, 1, 2, 4])
    assert table.propose([9, 1, 2], 3) == [3, 1, 2]
    assert PromptLookup(fallback=table).propose([7, 1, 2], 2) == [3, 1]


def test_expected_speedup_formula():
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_speedup(0.8, 4, 0.0) == pytest.approx(expected_tokens_per_round(0.8, 4))
    assert expected_speedup(0.8, 4, 0.5) < 1.2


def test_speculation_vs_batch_rows(pair, mlp_draft):
    target, draft, _ = pair
    for d in (draft, mlp_draft):
        rows = speculation_vs_batch(target, d, k=2, alpha=0.5, sizes=(1, 4), context=16, repeats=2)
        assert [r["batch_size"] for r in rows] == [1, 4]
        assert all(r["verify_s"] > 0 and r["draft_s"] > 0 and r["predicted_speedup"] > 0 for r in rows)
    free = speculation_vs_batch(target, "lookup", k=2, alpha=0.5, sizes=(1,), context=16, repeats=2)
    assert free[0]["draft_s"] == 0


def test_where_speculation_stops_paying_is_in_the_stats(pair, mlp_draft):
    target, draft, tok = pair
    for d in (draft, mlp_draft, "lookup"):
        g = speculative_generate(target, d, tok, PROMPTS[0], k=4, max_new_tokens=16, ignore_eos=True,
                                 batch_sizes=(1, 64))
        by = g.stats["predicted_speedup_by_batch"]
        assert set(by) == {1, 64} and all(v > 0 for v in by.values())
        losing = [b for b, v in by.items() if v < 1]
        assert g.stats["stops_paying_at_batch"] == (min(losing) if losing else None)
    assert "stops_paying_at_batch" not in speculative_generate(target, draft, tok, "A", max_new_tokens=4).stats
    rows = [dict(batch_size=1, predicted_speedup=1.3), dict(batch_size=8, predicted_speedup=0.9),
            dict(batch_size=16, predicted_speedup=0.7)]
    assert stops_paying_at(rows) == 8 and stops_paying_at(rows[:1]) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k"), (dict(draft="ngrams"), "draft must be"), (dict(temperature=-1), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(batch_sizes=(0,)), "batch_sizes"), (dict(batch_sizes=()), "batch_sizes"),
])
def test_bad_arguments(pair, kwargs, message):
    target, draft, tok = pair
    kwargs.setdefault("draft", draft)
    with pytest.raises(ValueError, match=message):
        speculative_generate(target, kwargs.pop("draft"), tok, "A", **kwargs)


def test_vocabulary_mismatch_is_refused(pair):
    target, _, tok = pair
    other = llmopt.build_model(llmopt.ModelConfig(vocab_size=100, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                                  intermediate_size=32))
    with pytest.raises(ValueError, match="vocabularies differ"):
        speculative_generate(target, other, tok, "A")
    from llmopt.draft import MLPDraft, MLPDraftConfig
    with pytest.raises(ValueError, match="vocabularies differ"):
        speculative_generate(target, MLPDraft(MLPDraftConfig(vocab_size=100)), tok, "A")


def test_stop_and_eos(pair):
    target, draft, tok = pair
    ref = llmopt.generate(target, tok, "ROMEO:", max_new_tokens=80, stop=["\n\n"])
    g = speculative_generate(target, draft, tok, "ROMEO:", max_new_tokens=80, stop=["\n\n"])
    assert g.text == ref.text and g.finish_reason == ref.finish_reason
