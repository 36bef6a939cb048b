"""Turning logits into the next token: greedy, temperature, top-k, top-p (notebook 00)."""
from __future__ import annotations

import torch

from .config import check_count


def check_sampling(temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None) -> None:
    """Raise ValueError naming the bad parameter and the allowed range."""
    if not isinstance(temperature, (int, float)) or temperature != temperature or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    check_count(top_k, "top_k", optional=True)
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def check_penalties(presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    repetition_penalty: float = 1.0) -> None:
    """Raise ValueError naming a penalty outside its range (OpenAI's for presence and frequency)."""
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
            raise ValueError(f"{name} must be a number in [-2, 2] (0: none), got {value!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
            or not 0 < repetition_penalty < float("inf"):
        raise ValueError(f"repetition_penalty must be a number > 0 (1: none; above 1 discourages repeats), "
                         f"got {repetition_penalty!r}")


def checked_logit_bias(logit_bias, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias` as {token id: bias}: ids may come as JSON's strings; each bias in [-100, 100]
    and each id in the vocabulary, or a ValueError naming the entry."""
    if logit_bias is None:
        return None
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias in [-100, 100], got {logit_bias!r:.60}")
    out = {}
    for key, bias in logit_bias.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():      # JSON's keys are strings
            tok = int(key)
        elif isinstance(key, int) and not isinstance(key, bool):
            tok = key
        else:
            raise ValueError(f"logit_bias keys are token ids, got {key!r}")
        if not 0 <= tok < vocab_size:
            raise ValueError(f"logit_bias: token id {key!r} is outside the vocabulary [0, {vocab_size})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"logit_bias: the bias of token {tok} must be a number in [-100, 100], got {bias!r}")
        out[tok] = float(bias)
    return out or None


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor | None, *,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    repetition_penalty: float = 1.0) -> torch.Tensor:
    """Logits [V] (fp32) with repetition discouraged, before temperature and sampling (vLLM's order).

    `counts` [V]: how often each token was generated so far. OpenAI's penalties act on those:
    `frequency_penalty` x count + `presence_penalty` x (count > 0) is subtracted. The
    repetition penalty (CTRL, transformers' `repetition_penalty`) acts on every token seen,
    the prompt's too (`seen` [V] bool, or None for none): a positive logit is divided by it, a
    negative one multiplied.
    """
    logits = logits.float()
    if repetition_penalty != 1.0:
        hit = counts > 0 if seen is None else (counts > 0) | seen
        scaled = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(hit, scaled, logits)
    if frequency_penalty:
        logits = logits - frequency_penalty * counts
    if presence_penalty:
        logits = logits - presence_penalty * (counts > 0)
    return logits


def apply_penalties_rows(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor,
                         presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """`apply_penalties` for many rows at once (the engine's step): logits, counts [A, V] (fp32),
    seen [A, V] bool, and each row's penalties as [A, 1] tensors. Element for element the same
    arithmetic, so a row's result equals `apply_penalties` on it alone (a repetition penalty of 1
    and penalties of 0 leave a logit as it was)."""
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where((counts > 0) | seen, scaled, logits)
    return logits - frequency * counts - presence * (counts > 0)


def check_seed(seed) -> None:
    """Raise ValueError unless `seed` is an integer or None (None: a fresh random seed)."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


def seeded_generator(seed: int | None, temperature: float, device) -> torch.Generator | None:
    """A request's own random generator when it samples (temperature > 0), None when greedy."""
    check_seed(seed)
    if not temperature > 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    return gen


GREEDY_CHUNK = 1024   # logits per first-stage block of `greedy`'s two-stage reduction on a GPU


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The highest-scoring token ids along the last dimension (the first one on ties): argmax.

    Written as `max(dim=-1).indices`, the same result: ATen's CPU argmax is not vectorized
    and took 1.6-4.4x as long here (2-core Xeon, torch 2.13: 63 vs 39 us for 32,000 fp32
    logits, 150 vs 36 us in bf16), a visible slice of a 5 ms decode step.
    On a GPU a large vocabulary goes through `greedy_two_stage`: one row's argmax ran as a
    single reduction over all 128,256 logits, 28.7 us of a 1.43 ms decode step on an H100
    (Inductor does not split an argmax across programs; ATen's eager one took 35 us).
    """
    if logits.device.type == "cuda" and logits.shape[-1] > 4 * GREEDY_CHUNK:
        return greedy_two_stage(logits)
    return logits.max(dim=-1).indices


def greedy_two_stage(logits: torch.Tensor, chunk: int = GREEDY_CHUNK) -> torch.Tensor:
    """`greedy` as two small reductions: the max of each block of `chunk` logits (many blocks at
    once, so a GPU spreads them over its SMs), then the first block holding the overall max.
    Ties go to the first index as in `torch.argmax`; a row with NaN gives its first NaN, as `max`."""
    v = logits.shape[-1]
    n = -(-v // chunk)
    if n * chunk != v:      # pad the last block with -inf (a masked load once compiled)
        logits = torch.nn.functional.pad(logits, (0, n * chunk - v), value=float("-inf"))
    best, where = logits.reshape(*logits.shape[:-1], n, chunk).max(dim=-1)       # [..., n]
    block = best.max(dim=-1, keepdim=True).indices                                # [..., 1]
    return (block * chunk + where.gather(-1, block)).squeeze(-1)


def probabilities(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The distribution [B, V] (fp32) that `sample` draws from at temperature > 0, after top-k and top-p.

    Speculative decoding (notebook 09) needs it explicitly, to accept or reject draft tokens.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]   # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the top one always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]. Temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return greedy(logits)
    probs = probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
