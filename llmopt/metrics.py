"""Quality metrics (notebooks 00 and 11).

Perplexity is measured on the fixed held-out test split, never on a model's own
samples (a model that repeats itself would score well on those). The other
metrics compare generations (distinct-n, repetition) or two models' next-token
distributions (top-1 agreement, KL divergence) on the same text.

Every function takes a model callable as `model(input_ids [B, T]) -> logits
[B, T, V]`; a `transformers` model works too (its `.logits` are used).
"""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F

from .data import load_text


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] from an llmopt model or a `transformers` model (its `.logits`)."""
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def as_token_ids(ids, what: str) -> torch.Tensor:
    """One text's token ids as a 1-D long tensor: a list, a 1-D tensor or a [1, T] batch of one."""
    ids = torch.as_tensor(ids, dtype=torch.long) if not isinstance(ids, torch.Tensor) else ids
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(f"{what} scores one text: give its token ids as a list, a 1-D tensor or a "
                         f"[1, T] tensor of integers, got a {ids.dtype} tensor of shape {tuple(ids.shape)} "
                         "(for several texts, join them, or call it once per text)")
    return ids


def check_vocab(model, ids: torch.Tensor, what: str) -> None:
    """A clear error when token ids fall outside the model's embedding table (the ids of another
    model's tokenizer), instead of an IndexError deep in the forward (notebook 11's metrics)."""
    emb = (model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None))
           else getattr(model, "embed_tokens", None))
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"{what}: token id {high if high >= vocab else low} is outside this model's "
                         f"vocabulary [0, {vocab}): the ids come from another model's tokenizer; encode "
                         "the text with this model's own")


def heldout_ids(tokenizer, split: str = "test", max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of a held-out split (1-D), optionally truncated to `max_tokens`."""
    ids = tokenizer.encode(load_text(split, eos="\n\n"))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer=None, *, split: str = "test", ids: torch.Tensor | None = None,
               context: int = 256, stride: int | None = None, max_tokens: int | None = None) -> float:
    """Sliding-window perplexity of held-out text (notebook 11).

    Windows of `context` tokens move by `stride` (default context/2); each token
    is scored once, with at least context-stride tokens of history after the first
    window. Pass `ids` to score your own text, or a tokenizer to use `split`.
    `model` may also be a model behind a server: `llmopt.server.Client(url)` (llmopt's or
    any OpenAI-compatible server that answers `echo` with log-probabilities), whose
    `prompt_logprobs` scores each window over HTTP (notebook 13).
    """
    if ids is None:
        if tokenizer is None:
            raise ValueError("perplexity needs a tokenizer (to encode the split) or ids")
        ids = heldout_ids(tokenizer, split, max_tokens)
    ids = as_token_ids(ids, "perplexity")
    served = callable(getattr(model, "prompt_logprobs", None))      # a server's client
    if not served:
        check_vocab(model, ids, "perplexity")
    stride = stride or max(1, context // 2)
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in (0, context={context}], got {stride}")
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens of text")
    device = None if served else device_of(model)
    nll, counted, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids))
        # score only the tokens this window adds (those after the previous window's end)
        first_new = max(prev_end - begin - 1, 0)
        if served:                      # log p(token i + 1 | the window before it), the first is None
            nll -= sum(model.prompt_logprobs(ids[begin:end].tolist())[1 + first_new:])
        else:
            window = ids[begin:end].to(device)[None]
            logits = logits_of(model, window)[0, :-1].float()
            targets = window[0, 1:]
            nll += F.cross_entropy(logits[first_new:], targets[first_new:], reduction="sum").item()
        counted += end - begin - 1 - first_new
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / counted)


def distinct_n(texts_or_ids, n: int = 2) -> float:
    """Unique n-grams / all n-grams over a set of generations (1.0 = no repeats)."""
    grams: Counter = Counter()
    for seq in texts_or_ids:
        toks = seq.split() if isinstance(seq, str) else list(seq)
        grams.update(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def repetition_rate(seq, n: int = 4) -> float:
    """Share of n-grams in one generation that already occurred earlier in it."""
    toks = seq.split() if isinstance(seq, str) else list(seq)
    seen, repeats, total = set(), 0, 0
    for i in range(len(toks) - n + 1):
        g = tuple(toks[i:i + n])
        repeats += g in seen
        seen.add(g)
        total += 1
    return repeats / total if total else 0.0


@torch.no_grad()
def compare_next_token(model, reference, ids: torch.Tensor, context: int = 256) -> dict:
    """Top-1 agreement and mean KL(reference || model) of next-token distributions on `ids`."""
    ids = as_token_ids(ids, "compare_next_token")
    check_vocab(model, ids, "compare_next_token")
    check_vocab(reference, ids, "compare_next_token (the reference)")
    ids = ids[: (len(ids) // context) * context or len(ids)]
    agree, kl, count = 0, 0.0, 0
    for begin in range(0, len(ids), context):
        window = ids[begin:begin + context][None]
        p_logits = logits_of(reference, window.to(device_of(reference)))[0].float().cpu()
        q_logits = logits_of(model, window.to(device_of(model)))[0].float().cpu()
        agree += (p_logits.argmax(-1) == q_logits.argmax(-1)).sum().item()
        kl += F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1),
                       log_target=True, reduction="sum").item()
        count += window.shape[1]
    return {"top1_agreement": agree / count, "kl_divergence": kl / count, "tokens": count}


def token_agreement(a, b) -> float:
    """Share of positions where two generated id sequences agree (over the shorter length)."""
    n = min(len(a), len(b))
    return sum(int(x) == int(y) for x, y in zip(a[:n], b[:n])) / n if n else 1.0


# How close two tokens' log-probabilities must be for a greedy choice between them to count
# as a tie that a different kernel, batch shape or summation order may flip, per compute
# dtype: a few units in the last place of a logit (bf16 keeps 8 significant bits, so a
# logit near 20 is stored to 0.125; fp32 keeps 24).
TIE_GAP = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 0.1, torch.bfloat16: 0.5}


def compute_dtype(model) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point parameter."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def greedy_divergence(model, prompt, reference, candidate) -> dict:
    """Where two greedy continuations of `prompt` part, and whether they part at a tie.

    `reference` and `candidate` are token id lists that should be the same greedy output
    (cached and uncached, batched and alone, compiled and eager). Where they first differ,
    `model` is run once from scratch over the prompt and their shared prefix: the parting
    is a tie when both tokens are within `TIE_GAP[dtype]` of the best log-probability there
    (numerics, not a bug), otherwise a fault. Returns identical, position (None when
    identical), tokens (reference's, candidate's), gap (the larger log-probability distance
    to the best), tie_gap, tie, and agreement (the share of positions that agree).
    """
    reference, candidate = [int(t) for t in reference], [int(t) for t in candidate]
    out = {"identical": reference == candidate, "position": None, "tokens": None, "gap": 0.0,
           "tie_gap": TIE_GAP.get(compute_dtype(model), 1e-3), "tie": False,
           "agreement": token_agreement(reference, candidate)}
    if out["identical"]:
        return out
    n = min(len(reference), len(candidate))
    pos = next((i for i in range(n) if reference[i] != candidate[i]), n)
    out["position"] = pos
    if pos == n:  # one is a prefix of the other: one stopped early, which no tie explains
        out["tokens"] = (reference[pos] if pos < len(reference) else None,
                         candidate[pos] if pos < len(candidate) else None)
        out["gap"] = float("inf")
        return out
    prompt = [int(t) for t in as_token_ids(prompt, "greedy_divergence")]
    ids = torch.tensor([prompt + reference[:pos]], device=device_of(model))
    logp = torch.log_softmax(logits_of(model, ids)[0, -1].float(), -1)
    a, b = reference[pos], candidate[pos]
    out["tokens"] = (a, b)
    out["gap"] = (logp.max() - torch.minimum(logp[a], logp[b])).item()
    out["tie"] = out["gap"] <= out["tie_gap"]
    return out


def check_same_greedy(model, prompt, reference, candidate, what: str = "the candidate") -> dict:
    """Assert `candidate` is the greedy output `reference` is, up to a tie (`greedy_divergence`).

    With llmopt's fp32 `tiny` the outputs are identical; with a real checkpoint in bf16 on a
    GPU a different batch shape or kernel may flip a near-tie, after which the two texts
    differ and neither is wrong. Raises AssertionError naming `what` and the parting
    otherwise. Returns `greedy_divergence`'s dict.
    """
    d = greedy_divergence(model, prompt, reference, candidate)
    if not d["identical"] and not d["tie"]:
        raise AssertionError(
            f"{what} changed the greedy output at token {d['position']}: {d['tokens'][0]} became "
            f"{d['tokens'][1]}, {d['gap']:.3g} nats from the best log-probability there (a tie is within "
            f"{d['tie_gap']:g} in {compute_dtype(model)}), so not a rounding near-tie")
    return d
