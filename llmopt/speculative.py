"""Speculative decoding: a cheap draft proposes, the target verifies in one forward (notebook 09).

Decoding one token costs the target a full read of its weights. Speculation lets
a draft guess `k` tokens, then runs the target once over all of them: where the
target agrees, several tokens come out of one target forward.

One round, with x the last token and n tokens in the sequence:
    draft:  x -> d1 -> d2 ... -> dk            (k cheap steps, or a lookup)
    target: forward([x, d1, ..., dk])          (one step over k+1 positions)
    accept d1..da while the target agrees; then one token from the target itself
    (the correction at the first disagreement, or a bonus token if all k agreed).
So every round yields between 1 and k+1 tokens. Rejected positions stay in the
caches but are never read again: the next write overwrites them and the mask
hides them (the "rollback" costs nothing with a static cache).

Greedy: a draft token is accepted when it is the target's argmax, so the output
is the target's own greedy output. Sampling: a draft token d drawn from q is
accepted with probability min(1, p(d) / q(d)), and on rejection the token is drawn
from max(0, p - q) renormalized; the output then follows the target's distribution
p exactly (Leviathan et al. 2023, Chen et al. 2023).

Drafts: a smaller transformer (`draft=model`, with its own KV cache); a proposer with
`propose(tokens, k)`: the MLP draft `tiny-draft` (llmopt.draft: a neural n-gram built to
cost ~1/10 of the target's step on a CPU), an n-gram table from the corpus; or prompt lookup
(`draft="lookup"`): the continuation of the last n-gram's previous occurrence in the
sequence, free to compute. A proposer's tokens count as certain (q = 1), which keeps the
sampling rule exact: accept d with probability p(d), else draw from p without d.
"""
from __future__ import annotations

import time

import torch

from .config import check_count
from .draft import MLPDraft
from .generate import Generation, TextStream, _as_stop_list, _checked_request, _eos_ids, timing_stats
from .kv_cache import make_cache
from .model import check_llmopt_model
from .sampling import check_sampling, probabilities, seeded_generator
from .sampling import greedy as greedy_ids


def lookup_draft(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n-gram
    (longest n first) and propose the up to `k` tokens that followed it; [] if none.

    One pass over the earlier occurrences of the last token, latest first, found by `list.index`
    on a reversed copy (C speed): each is checked for how many of the tokens before it match too,
    and the first with `max_ngram` of them wins at once. Every proposal of a serving engine's
    every row and step pays this, so it must not be a Python loop over the whole sequence: at
    4,000 tokens with no match that loop took 1.3 ms a call on a 2-core Xeon.
    """
    n_tok = len(tokens)
    top = min(max_ngram, n_tok - 1)
    if top < min_ngram or k <= 0:
        return []
    last = tokens[-1]
    earlier = tokens[-2::-1]               # tokens[n_tok - 2], tokens[n_tok - 3], ..., tokens[0]
    found = {}                             # n -> the latest end position whose last n tokens match the tail's
    j = 0
    while True:
        try:
            j = earlier.index(last, j)
        except ValueError:
            break
        e = n_tok - 2 - j                  # an earlier position holding the last token
        n = 1
        while n < top and e - n >= 0 and tokens[e - n] == tokens[n_tok - 1 - n]:
            n += 1
        for m in range(min_ngram, n + 1):
            found.setdefault(m, e)
        if n == top:
            break                          # the longest n-gram, at its latest place: nothing beats it
        j += 1
    for n in range(top, min_ngram - 1, -1):
        if n in found:
            return tokens[found[n] + 1:found[n] + 1 + k]
    return []


class PromptLookup:
    """Model-free draft: the continuation of the last n-gram's previous occurrence
    (`lookup_draft`); when there is none, `fallback` (say an `NGramDraft`) proposes."""
    name = "prompt lookup"

    def __init__(self, max_ngram: int = 3, fallback=None) -> None:
        self.max_ngram, self.fallback = max_ngram, fallback
        if fallback is not None:
            self.name = f"prompt lookup + {fallback.name}"

    def propose(self, tokens: list[int], k: int) -> list[int]:
        out = lookup_draft(tokens, k, self.max_ngram)
        if not out and self.fallback is not None:
            out = self.fallback.propose(tokens, k)
        return out


class NGramDraft:
    """Model-free draft from corpus statistics: the most frequent next token after the
    last two tokens (backing off to the last one), chained k times. A dictionary
    lookup per token, microseconds, so nearly free next to any forward pass.

    `NGramDraft.from_ids(ids)` counts a token stream (say the training split);
    `from_text(tokenizer, text)` tokenizes first.
    """
    name = "n-gram table"

    def __init__(self, trigram: dict, bigram: dict) -> None:
        self.trigram, self.bigram = trigram, bigram

    @classmethod
    def from_ids(cls, ids: list[int]) -> "NGramDraft":
        from collections import Counter, defaultdict
        tri: dict = defaultdict(Counter)
        bi: dict = defaultdict(Counter)
        for a, b, c in zip(ids, ids[1:], ids[2:]):
            tri[(a, b)][c] += 1
            bi[b][c] += 1
        return cls({key: c.most_common(1)[0][0] for key, c in tri.items()},
                   {key: c.most_common(1)[0][0] for key, c in bi.items()})

    @classmethod
    def from_text(cls, tokenizer, text: str) -> "NGramDraft":
        return cls.from_ids(tokenizer.encode(text))

    def propose(self, tokens: list[int], k: int) -> list[int]:
        a, b = (tokens[-2] if len(tokens) > 1 else None), tokens[-1]
        out = []
        for _ in range(k):
            nxt = self.trigram.get((a, b), self.bigram.get(b))
            if nxt is None:
                break
            out.append(nxt)
            a, b = b, nxt
        return out


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Expected tokens per target forward when each draft token is accepted with probability alpha:
    (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Expected speed-up over plain decoding: tokens per round / (k draft steps + 1 target step),
    with `cost_ratio` = one draft step's time / one target step's time (Leviathan et al., eq. 1)."""
    return expected_tokens_per_round(alpha, k) / (k * cost_ratio + 1)


class _Model:
    """A model with a static cache and a count of the positions it holds (for the draft and the target)."""

    def __init__(self, model, max_len: int) -> None:
        self.model = model
        self.cache = make_cache("static", model.config, 1, max_len, device=model.device, dtype=model.dtype)
        self.pos = 0          # positions 0 .. pos-1 are in the cache and valid
        self.forwards = 0
        self.seconds = 0.0

    def feed(self, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run `tokens` at positions pos..; returns logits [T, V] (or the last [V])."""
        t0 = time.perf_counter()
        dev = self.model.device
        ids = torch.tensor([tokens], device=dev)
        input_pos = torch.arange(self.pos, self.pos + len(tokens), device=dev)
        logits = self.model(ids, input_pos, self.cache, last_only=not all_logits)[0]
        self.pos += len(tokens)
        self.forwards += 1
        self.seconds += time.perf_counter() - t0
        return logits if all_logits else logits[-1]


def speculative_generate(target, draft, tokenizer, prompt, *, k: int = 4, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         seed: int | None = None, stop=None, ignore_eos: bool = False,
                         max_ngram: int = 3, batch_sizes: tuple[int, ...] | None = None) -> Generation:
    """Generate with speculative decoding: `draft` (a smaller model sharing the target's
    tokenizer, a proposer such as `load_model("tiny-draft")[0]`, or "lookup" for prompt
    lookup) proposes `k` tokens per round, `target`
    verifies them in one forward. Greedy output equals `generate(target, ...)`'s.

    Extra stats: acceptance_rate (accepted / checked draft tokens: a rejection ends the
    round, so the drafts after it are never checked and do not count), proposed, accepted,
    tokens_per_target_forward, target_forwards, draft_forwards,
    expected_tokens_per_round (from the acceptance rate) and
    draft_cost_ratio / expected_speedup (from the measured step times).

    With `batch_sizes` (say (1, 2, 4, ..., 64)) it also times the target's decode and verify
    steps and the draft's step at each batch size after generating (`speculation_vs_batch`, with
    this run's acceptance rate) and adds predicted_speedup_by_batch and
    stops_paying_at_batch: the smallest of those sizes where the predicted speed-up is below 1
    (None if it paid at every size). Off by default: it costs a few hundred extra forwards.
    """
    start = time.perf_counter()
    check_count(k, "k (draft tokens per round)")
    if batch_sizes is not None and (not batch_sizes or not all(isinstance(b, int) and b >= 1
                                                                for b in batch_sizes)):
        raise ValueError(f"batch_sizes must be positive integers (batch sizes to predict the "
                         f"speed-up at), got {batch_sizes!r}")
    if draft == "lookup":
        draft = PromptLookup(max_ngram)
    # a proposer: prompt lookup, n-gram tables, or the MLP draft (llmopt.draft) with its own loop
    lookup = hasattr(draft, "propose")
    if isinstance(draft, str):
        raise ValueError(f"draft must be a model, 'lookup' (prompt lookup) or an object with "
                         f"propose(tokens, k), got {draft!r}")
    check_llmopt_model(target, "speculative decoding (the target)")
    if not lookup:
        check_llmopt_model(draft, "speculative decoding (the draft)")
    draft_cfg = getattr(draft, "config", None)
    if draft_cfg is not None and draft_cfg.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft and target vocabularies differ ({draft_cfg.vocab_size} vs "
                         f"{target.config.vocab_size}): the draft must share the target's tokenizer; "
                         "train an MLP draft for this target with `python -m llmopt.draft --target "
                         "TARGET_FOLDER --out DRAFT_FOLDER`, or use a model-free draft ('lookup', NGramDraft)")
    if not lookup:
        if draft.device != target.device:
            raise ValueError(f"draft is on {draft.device}, target on {target.device}: move both to one device")
    check_sampling(temperature, top_k, top_p)
    ids = _checked_request(target, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, "static",
                           seed=seed)
    stop = _as_stop_list(stop)
    eos = _eos_ids(tokenizer, ignore_eos)
    watch = TextStream(tokenizer, stop) if stop else None      # the text so far, for the stop strings
    gen = seeded_generator(seed, temperature, target.device)
    max_len = len(ids) + max_new_tokens + k + 1
    if max_len > target.config.max_seq_len:
        max_len = target.config.max_seq_len
    greedy = temperature == 0

    def pick(logits: torch.Tensor) -> int:
        if greedy:
            return int(greedy_ids(logits))
        return int(torch.multinomial(probabilities(logits, temperature, top_k, top_p), 1, generator=gen))

    tokens = list(ids)
    new: list[int] = []
    times: list[float] = []
    proposed = accepted = rejected = rounds = 0
    draft_seconds = 0.0
    reason, text = "length", None
    with torch.inference_mode():
        tgt = _Model(target, max_len)
        drf = None if lookup else _Model(draft, max_len)
        pending = [pick(tgt.feed(tokens))]       # prefill; the draft catches up in its first round
        while True:
            # record the tokens this round produced; stop on eos / stop string / length
            done = False
            for tok in pending:
                tokens.append(tok)
                new.append(tok)
                times.append(time.perf_counter() - start)
                if tok in eos:
                    reason, done = "eos", True
                elif watch is not None:
                    watch.push(tok)
                    if watch.stopped:
                        reason, text, done = "stop", watch.text, True
                if done or len(new) >= max_new_tokens:
                    done = True
                    break
            if done:
                break
            budget = min(k, max_new_tokens - len(new), max_len - len(tokens))   # drafts that can still be used
            drafts, q = [], []
            if budget > 0 and lookup:
                t0 = time.perf_counter()
                drafts = list(draft.propose(tokens, budget))[:budget]
                draft_seconds += time.perf_counter() - t0
            elif budget > 0:
                logits = drf.feed(tokens[drf.pos:])          # catch the draft up (1 or 2 tokens)
                for i in range(budget):
                    if greedy:
                        d = int(greedy_ids(logits))
                    else:
                        qi = probabilities(logits, temperature, top_k, top_p)
                        d = int(torch.multinomial(qi, 1, generator=gen))
                        q.append(qi)
                    drafts.append(d)
                    if i < budget - 1:
                        logits = drf.feed([d])
            # verify: one target forward over the unseen token(s) and the drafts
            fed = tokens[tgt.pos:]
            logits = tgt.feed(fed + drafts, all_logits=True)[len(fed) - 1:]          # [len(drafts)+1, V]
            rounds += 1
            proposed += len(drafts)
            best = greedy_ids(logits).tolist() if greedy else None     # one host copy for the round
            pending, n_ok = verify_drafts(logits, drafts, temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=gen, q=q or None, best=best)
            rejected += n_ok < len(drafts)
            accepted += n_ok
            # roll back: the caches keep only positions that hold accepted tokens
            tgt.pos = len(tokens) + n_ok
            if drf is not None:
                drf.pos = min(drf.pos, len(tokens) + n_ok)
    if text is None:
        text = tokenizer.decode(new) if tokenizer is not None else ""
    stats = timing_stats(times, len(ids))
    alpha = accepted / (accepted + rejected) if accepted + rejected else 0.0
    target_step = tgt.seconds / tgt.forwards
    if drf is not None:     # time of one draft step / one target step
        cost_ratio = (drf.seconds / drf.forwards) / target_step if drf.forwards else 0.0
    else:
        cost_ratio = (draft_seconds / max(1, proposed)) / target_step
    stats.update(device=str(target.device), dtype=str(target.dtype).removeprefix("torch."), cache="static",
                 compiled=False, k=k, draft=getattr(draft, "name", type(draft).__name__),
                 rounds=rounds, proposed=proposed, accepted=accepted, rejected=rejected, acceptance_rate=alpha,
                 target_forwards=tgt.forwards,
                 # a neural proposer (the MLP draft) runs one forward per proposed token
                 draft_forwards=drf.forwards if drf else (proposed if isinstance(draft, torch.nn.Module) else 0),
                 tokens_per_target_forward=len(new) / tgt.forwards,
                 expected_tokens_per_round=expected_tokens_per_round(alpha, k),
                 draft_cost_ratio=cost_ratio, expected_speedup=expected_speedup(alpha, k, cost_ratio))
    if batch_sizes is not None:
        rows = speculation_vs_batch(target, draft, k=k, alpha=alpha, sizes=tuple(batch_sizes),
                                    context=min(len(tokens), target.config.max_seq_len - k - 1))
        stats.update(predicted_speedup_by_batch={r["batch_size"]: r["predicted_speedup"] for r in rows},
                     stops_paying_at_batch=stops_paying_at(rows))
    return Generation(token_ids=new, text=text, prompt_ids=ids, finish_reason=reason, stats=stats,
                      token_times=times)


def verify_drafts(logits: torch.Tensor, drafts: list[int], *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                  q: list[torch.Tensor] | None = None, best: list[int] | None = None) -> tuple[list[int], int]:
    """One verification: the tokens the target keeps from `drafts` (d1..dm), given its logits
    [m + 1, V] at the positions of the last known token and of each draft. Returns (tokens, a):
    the a drafts it accepted, then its own token (the correction at the first rejection, or a
    bonus token after the last draft), so 1 to m + 1 tokens.

    Greedy (temperature 0): a draft is accepted when it is the target's argmax (`best`: the
    argmax at every position, when the caller has it already). Sampling: d is accepted with
    probability min(1, p(d) / q(d)) using `generator`, and a rejection draws from max(0, p - q)
    renormalized, with `q` the draft's distributions, or a point mass on d (a proposer's tokens:
    q=None), when the residual is p without d. The tokens then follow p exactly. Every position's
    p is computed at once and the m uniform draws are compared on the device, read back together:
    two host syncs a verification (the other is the token drawn), not two a draft.
    """
    if temperature == 0:
        best = best if best is not None else greedy_ids(logits).tolist()
        n_ok = 0
        while n_ok < len(drafts) and drafts[n_ok] == best[n_ok]:
            n_ok += 1
        return list(drafts[:n_ok]) + [best[n_ok]], n_ok
    m = len(drafts)
    p = probabilities(logits[:m + 1], temperature, top_k, top_p)            # [m + 1, V], every position at once
    if m:
        d = torch.tensor(drafts, device=p.device)
        pd = p[torch.arange(m, device=p.device), d]
        qd = torch.stack([q[i][drafts[i]] for i in range(m)]) if q else torch.ones_like(pd)
        ok = (torch.rand(m, generator=generator, device=p.device) * qd < pd).tolist()   # one copy to the host
        n_ok = ok.index(False) if False in ok else m
    else:
        n_ok = 0
    if n_ok < m:             # the first rejection: draw from what p has beyond q there
        resid = (p[n_ok] - q[n_ok]).clamp(min=0) if q else p[n_ok].clone()
        if not q:
            resid[drafts[n_ok]] = 0
        return list(drafts[:n_ok]) + [int(torch.multinomial(resid / resid.sum(), 1, generator=generator))], n_ok
    return list(drafts) + [int(torch.multinomial(p[m], 1, generator=generator))], m


def stops_paying_at(rows: list[dict]) -> int | None:
    """The smallest batch size in `speculation_vs_batch` rows whose predicted speed-up is
    below 1, or None if speculation paid at every measured size."""
    losing = [r["batch_size"] for r in rows if r["predicted_speedup"] < 1]
    return min(losing) if losing else None


def speculation_vs_batch(target, draft, *, k: int = 4, alpha: float, sizes=(1, 2, 4, 8, 16, 32),
                         context: int = 64, repeats: int = 20) -> list[dict]:
    """Where speculation stops paying as the batch grows (notebook 09).

    Measures, per batch size B, the target's decode step (T=1), its verify step
    (T=k+1) and the draft's step (0 for a model-free draft), then predicts
    speed-up(B) = E[tokens per round](alpha, k) x t_decode(B) / (k t_draft(B) + t_verify(B)).
    At batch 1 decoding is memory or overhead bound and a verify of k+1 tokens costs
    about one decode; as B grows the step turns compute bound, t_verify approaches
    (k+1) t_decode, and the predicted speed-up falls below 1.
    """
    from .profiling import measure
    rows = []
    gain = expected_tokens_per_round(alpha, k)
    for B in sizes:
        times = {}
        for name, m, T in (("decode", target, 1), ("verify", target, k + 1), ("draft", draft, 1)):
            if isinstance(m, MLPDraft):                   # no cache: a step reads `context` tokens a row
                ctx = torch.zeros(B, m.config.context, dtype=torch.long, device=m.device)
                step = lambda m=m, ctx=ctx: m(ctx)          # noqa: E731
            elif m is None or isinstance(m, str) or hasattr(m, "propose"):   # a model-free draft
                times[name] = 0.0
                continue
            else:
                cache = make_cache("static", m.config, B, context + T, device=m.device, dtype=m.dtype)
                ids = torch.zeros(B, T, dtype=torch.long, device=m.device)
                pos = torch.arange(context, context + T, device=m.device)
                step = lambda m=m, ids=ids, pos=pos, cache=cache: m(ids, pos, cache)   # noqa: E731
            with torch.inference_mode():
                times[name] = measure(step, warmup=3, repeats=repeats, device=str(m.device))["median"]
        speedup = gain * times["decode"] / (k * times["draft"] + times["verify"])
        rows.append(dict(batch_size=B, decode_s=times["decode"], verify_s=times["verify"],
                         draft_s=times["draft"], verify_over_decode=times["verify"] / times["decode"],
                         predicted_speedup=speedup))
    return rows
