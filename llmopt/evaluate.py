"""Quality beside speed for every technique: the scoreboard (notebook 11).

Each technique is a `Variant`: a model (for held-out perplexity and next-token
agreement with the fp32 baseline) and a `generate` function (for the text
metrics and the timings). `scoreboard` runs every variant on the same prompts
and the same fixed test split and returns one row each:

quality    perplexity (held-out test split), its change vs the baseline, distinct-1/2
           and type-token ratio (vocabulary richness of generations), repetition rate,
           context relevance (how much the prompt lowers the continuation's perplexity,
           judged by the fp32 baseline), top-1 agreement and KL against the baseline;
efficiency TTFT, TPOT, decode tokens/s, peak memory, model bytes, MBU.

Perplexity of a model's own samples is never used: a model that repeats itself
scores itself as very certain.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .metrics import (as_token_ids, compare_next_token, device_of, distinct_n, heldout_ids, logits_of, perplexity,
                      repetition_rate)


def type_token_ratio(texts_or_ids) -> float:
    """Distinct tokens / tokens over all sequences (1.0: no token repeats)."""
    seqs = [list(s) for s in texts_or_ids]
    tokens = [t for s in seqs for t in s]
    return len(set(tokens)) / len(tokens) if tokens else 0.0


@torch.no_grad()
def context_relevance(judge, prompts: list[list[int]], continuations: list[list[int]], *,
                      start_id: int = 0) -> dict:
    """How much conditioning on the prompt lowers the continuation's perplexity, under `judge`.

    For each pair, the judge scores the continuation after its prompt and after a
    bare start token. relevance = mean per-token NLL without the prompt minus with it
    (nats; > 0 means the continuation follows from its prompt). Off-topic text that
    is fluent scores near 0; text that only makes sense after its prompt scores high.
    """
    device = device_of(judge)
    with_p, without_p, n = 0.0, 0.0, 0
    for prompt, cont in zip(prompts, continuations):
        if not cont:
            continue
        for prefix, acc in ((prompt, "with"), ([start_id], "without")):
            ids = torch.tensor([list(prefix) + list(cont)], device=device)
            logits = logits_of(judge, ids)[0, len(prefix) - 1:-1].float()
            nll = F.cross_entropy(logits, ids[0, len(prefix):], reduction="sum").item()
            if acc == "with":
                with_p += nll
            else:
                without_p += nll
        n += len(cont)
    if not n:
        return {"relevance_nats": float("nan"), "ppl_with_prompt": float("nan"),
                "ppl_without_prompt": float("nan")}
    return {"relevance_nats": (without_p - with_p) / n, "ppl_with_prompt": math.exp(with_p / n),
            "ppl_without_prompt": math.exp(without_p / n)}


@dataclass
class Variant:
    """One technique on the scoreboard.

    model:    scored for perplexity and agreement (any module returning logits, or None to skip);
    generate: prompt -> Generation (timings and text metrics);
    note:     what the technique is, for the table.
    """
    model: object
    generate: Callable
    note: str = ""
    extra: dict = field(default_factory=dict)


def scoreboard(variants: dict[str, Variant], tokenizer, prompts: list[str], *, baseline: str,
               eval_tokens: int = 4096, context: int = 256, bandwidth: float | None = None,
               repeats: int = 3, text: str | None = None) -> list[dict]:
    """Quality and efficiency of every variant on the same prompts and test split (or `text`,
    your own: its first `eval_tokens` tokens); one row each.

    `baseline` names the fp32 reference variant: agreement, KL and the perplexity
    change are against it, and it judges context relevance.
    `bandwidth` (bytes/s, from `profiling.probe_bandwidth`) adds MBU. Timings are
    medians over `repeats` interleaved rounds of every prompt.
    """
    from .profiling import peak_memory
    from .quantize import model_bytes
    ref = variants[baseline].model
    ids = (heldout_ids(tokenizer, "test", max_tokens=eval_tokens) if text is None
           else as_token_ids(tokenizer.encode(text)[:eval_tokens], "scoreboard's text"))
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    # quality and peak memory, variant by variant (this pass also warms every variant up)
    rows, gens_of = [], {}
    for name, v in variants.items():
        box: list = []
        mem = peak_memory(lambda: box.extend(v.generate(p) for p in prompts))
        conts = [g.token_ids for g in box]
        row = dict(technique=name, note=v.note, peak_memory_mb=mem["delta_bytes"] / 2**20)
        if v.model is not None:
            row["perplexity"] = perplexity(v.model, ids=ids, context=context)
            agree = compare_next_token(v.model, ref, ids[: 2 * context], context=context)
            row.update(top1_agreement=agree["top1_agreement"], kl_divergence=agree["kl_divergence"])
            row["model_bytes"] = model_bytes(v.model) if isinstance(v.model, torch.nn.Module) else float("nan")
        row.update(distinct_1=distinct_n(conts, 1), distinct_2=distinct_n(conts, 2),
                   type_token_ratio=type_token_ratio(conts),
                   repetition_rate=sum(repetition_rate(c) for c in conts) / len(conts))
        row.update(context_relevance(ref, prompt_ids, conts))
        row.update(v.extra)
        rows.append(row)
        gens_of[name] = []
    # timings interleaved (every variant once per round), so a drifting machine hits all alike
    for _ in range(repeats):
        for name, v in variants.items():
            gens_of[name] += [v.generate(p) for p in prompts]
    for row in rows:
        stats = [g.stats for g in gens_of[row["technique"]]]
        med = lambda key: float(torch.tensor([s[key] for s in stats], dtype=torch.float64).nanmedian())  # noqa: E731
        row.update(ttft_s=med("ttft_s"), tpot_s=med("tpot_s"), decode_tokens_per_s=med("decode_tokens_per_s"))
        if bandwidth and "model_bytes" in row and row["tpot_s"] == row["tpot_s"]:
            row["mbu"] = row["model_bytes"] / row["tpot_s"] / bandwidth
    base = next(r for r in rows if r["technique"] == baseline)
    for r in rows:
        if "perplexity" in r:
            r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        r["speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def workbook_variants(model, tokenizer, *, new_tokens: int = 64, compile: bool = False,
                      ngram_text: str | None = None) -> dict[str, Variant]:
    """The workbook's techniques applied to (copies of) `model`, ready for `scoreboard`.

    fp32 baseline, bf16, int8 and int4 weight-only, 50% magnitude pruning, a
    structured cut of half the heads and MLP channels without recovery (the
    "faster but worse" example), speculative decoding, the continuous-batching
    engine and, with `compile`, the compiled decode step. Greedy decoding throughout.
    """
    import copy

    from .engine import Engine
    from .generate import generate
    from .precision import cast, dtype_name
    from .prune import magnitude_prune, prune_heads, prune_mlp
    from .quantize import int4_group_size, quantize
    from .speculative import NGramDraft, PromptLookup, speculative_generate

    def gen_with(m, **kw):
        return lambda p: generate(m, tokenizer, p, max_new_tokens=new_tokens, ignore_eos=True, **kw)

    cfg = model.config
    dtype = dtype_name(model.dtype)
    # the first variant is the baseline: "fp32 baseline" for tiny, a checkpoint as it was saved otherwise
    out = {f"{dtype} baseline": Variant(model, gen_with(model), f"static KV cache, eager, {dtype}")}
    if model.dtype != torch.bfloat16:
        bf16 = cast(copy.deepcopy(model), torch.bfloat16, strict=False)
        out["bf16 weights"] = Variant(bf16, gen_with(bf16), "weights and activations in bfloat16")
    int8 = quantize(copy.deepcopy(model), "int8")
    out["int8 weight-only"] = Variant(int8, gen_with(int8), "per-channel absmax")
    group = int4_group_size(model)       # 64 for tiny; another when 64 does not divide the widths
    if group is not None:
        int4 = quantize(copy.deepcopy(model), "int4", group_size=group)
        out[f"int4 weight-only (g{group})"] = Variant(int4, gen_with(int4), "group-wise, asymmetric")
    sparse = copy.deepcopy(model)
    magnitude_prune(sparse, 0.5)
    out["magnitude pruning 50%"] = Variant(sparse, gen_with(sparse), "unstructured; dense kernels")
    cut = prune_mlp(prune_heads(copy.deepcopy(model), max(1, cfg.n_kv_heads // 2)),
                    cfg.intermediate_size // 2)
    out["half the heads and channels"] = Variant(cut, gen_with(cut), "structured, no recovery fine-tune")
    from .data import load_text
    table = NGramDraft.from_text(tokenizer, ngram_text if ngram_text is not None else load_text("train"))
    draft = PromptLookup(fallback=table)
    out["speculative (lookup + n-gram)"] = Variant(model, lambda p: speculative_generate(
        model, draft, tokenizer, p, k=4, max_new_tokens=new_tokens, ignore_eos=True), "k=4, greedy")
    engine = Engine(model, tokenizer, max_batch_size=4)
    out["continuous-batching engine"] = Variant(model, lambda p: engine.generate_many(
        [p], max_new_tokens=new_tokens, ignore_eos=True)[0], "one request at a time, paged cache")
    if compile:
        out["compiled decode"] = Variant(model, gen_with(model, compile=True), "torch.compile, static cache")
    return out
