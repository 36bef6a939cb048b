"""The headless before/after suite behind `python -m llmopt bench` (notebook 00).

Each experiment returns result rows (plain dicts with device, dtype and model
beside every figure); `run_bench` runs the chosen ones, prints ratios and writes
`report.md`, `results.json` and PNG plots into one folder; on `tiny`, or on your own
checkpoint (`model=`), scored and prompted with the plays or your own text (`text=`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .config import ModelConfig, get_config
from .generate import generate
from .metrics import greedy_divergence
from .precision import check_device, dtype_name
from .profiling import device_info, hf_generate, measure_generation, measure_generations, roofline

DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


TEXT_CHARS = 1_000_000       # of your own text, the bench reads this much
MIN_TEXT_TOKENS = 128           # prompts of up to 64 tokens cut from it, and text after them


def read_bench_text(path: str | Path) -> str:
    """Your own text for the bench (`--text FILE`): a UTF-8 file, its first million characters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found: give the path of a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")[:TEXT_CHARS]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}): save it as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path} holds no text: give a file of the text your model will see")
    return text


def check_bench_text(text: str, tokenizer, where: str = "the text") -> int:
    """The text's length in tokens, or an error when it is too short to prompt and score with."""
    n = len(tokenizer.encode(text))
    if n < MIN_TEXT_TOKENS:
        raise ValueError(f"{where} is {n} tokens long with this model's tokenizer; the bench needs at least "
                         f"{MIN_TEXT_TOKENS} (give a longer text: perplexity uses up to 16,384 tokens)")
    return n


def eval_ids(tokenizer, text: str | None, max_tokens: int) -> torch.Tensor:
    """The ids quality is scored on: the plays' held-out test split, or the start of your text."""
    from .metrics import heldout_ids
    if text is None:
        return heldout_ids(tokenizer, "test", max_tokens=max_tokens)
    return torch.tensor(tokenizer.encode(text)[:max_tokens], dtype=torch.long)


def batch1_prompt(tokenizer, text: str | None):
    """The batch-1 prompt: Romeo's line, or your text's first 32 tokens (as ids)."""
    return DEFAULT_PROMPT if text is None else tokenizer.encode(text)[:32]


def split_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Your text's ids in two: the first 90% (what an n-gram draft may learn from) and the rest
    (where speculation's prompts come from, so no draft has seen what the target continues)."""
    ids = tokenizer.encode(text)
    cut = min(len(ids) * 9 // 10, len(ids) - 8)
    return ids[:cut], ids[cut:]


def prompt_spans(ids, n: int, length: int = 32, gap: int = 400) -> list[list[int]]:
    """`n` prompts of `length` tokens from `ids`, `gap` tokens apart (closer when the text is short)."""
    ids = list(ids)
    gap = min(gap, max(1, (len(ids) - length) // max(1, n - 1)))
    return [ids[i * gap:i * gap + length] for i in range(n)]


def ci_mode() -> bool:
    """True when LLMOPT_CI is set: every notebook and benchmark shrinks to CI sizes."""
    return os.environ.get("LLMOPT_CI", "").lower() not in ("", "0", "false", "no")


def to_transformers(model):
    """A `transformers` model with exactly this llmopt model's weights (in memory, no disk)."""
    from .model import check_unfused, check_unquantized
    check_unfused(model, "to_transformers")
    check_unquantized(model, "to_transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_cfg = model.config.to_hf()
    model_type = hf_cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **hf_cfg)
    with torch.device(model.device):
        hf = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weight names did not map onto transformers: {missing} {unexpected}")
    return hf.eval()


def decode_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, context: int, batch: int = 1) -> int:
    """Bytes one decode step reads: every weight once, plus the KV cache of `context` tokens per row."""
    return roofline(cfg, dtype, context, batch)["bytes_per_step"]


def compare_with_transformers(model, tokenizer, hf_model, *, prompt=DEFAULT_PROMPT,
                              new_tokens: int = 128, repeats: int = 3, label: str = "",
                              compiled: bool | str | tuple[str, ...] = False,
                              sync_every: int | None = None, graph_steps: int | None = None) -> list[dict]:
    """llmopt's generate vs `transformers` generate on the same weights: batch 1, greedy.

    Returns rows for llmopt (static cache, eager), llmopt with the compiled decode
    step when `compiled` (True: "reduce-overhead" on a GPU, "default" elsewhere; or the
    torch.compile mode, or a tuple of modes, one row each), each compiled path (or the
    eager one) again reading tokens back only every `sync_every` steps when given, the
    same with `graph_steps` decode steps per CUDA graph of llmopt's (`DecodeGraph`; one row
    per distinct step compile: reduce-overhead's own graphs are dropped inside it), and
    transformers; each row records whether its greedy tokens equal transformers'.
    """
    ids = prompt if not isinstance(prompt, str) else tokenizer.encode(prompt)
    ids_t = torch.tensor([ids], device=model.device)
    dtype = str(model.dtype).removeprefix("torch.")
    ctx = dict(model=label or getattr(model, "name", "model"), device=str(model.device), dtype=dtype,
               batch=1)
    if compiled is True:
        compiled = "reduce-overhead" if model.device.type == "cuda" else "default"
    modes = (compiled,) if isinstance(compiled, str) else tuple(compiled or ())
    variants = [("llmopt (static cache)", {})]
    variants += [(f"llmopt compiled decode ({mode})", {"compile": mode}) for mode in modes]
    if sync_every:      # each compiled path (or the eager one) again, reading tokens every k steps
        variants += [(f"{name}, sync every {sync_every} tokens", {**kw, "sync_every": sync_every})
                     for name, kw in (variants[1:] or variants)]
    if graph_steps:
        variants += graph_variants(modes, graph_steps)
    reference = hf_generate(hf_model, ids_t, max_new_tokens=new_tokens).token_ids
    runs, first = {}, {}
    for name, kw in variants:
        run = lambda kw=kw: generate(model, tokenizer, ids, max_new_tokens=new_tokens,  # noqa: E731
                                     ignore_eos=True, **kw)
        t0 = time.perf_counter()
        tokens = run().token_ids            # also the warm-up (and the compile, when compiling)
        first[name] = (time.perf_counter() - t0, tokens)
        runs[name] = run
    runs["transformers generate"] = lambda: hf_generate(hf_model, ids_t, max_new_tokens=new_tokens)
    rows = measure_generations(runs, warmup=1, repeats=repeats, **ctx)
    for row in rows[:-1]:
        first_call_s, tokens = first[row["label"]]
        row["first_call_s"] = first_call_s
        row["greedy_token_agreement"] = sum(a == b for a, b in zip(tokens, reference)) / max(1, len(tokens))
    rows[-1]["greedy_token_agreement"] = 1.0
    return rows


def graph_variants(modes, k: int, suffix: str = "") -> list[tuple[str, dict]]:
    """(label, generate options) for decoding with k steps per `DecodeGraph`: eager when no
    `modes`, else one per distinct compile of the recorded step (reduce-overhead's is default's)."""
    from .generate import GRAPH_STEP_MODES
    if not modes:
        return [(f"llmopt (static cache){suffix}, {k} steps per CUDA graph", {"graph_steps": k})]
    seen, out = set(), []
    for mode in modes:
        torch_mode = GRAPH_STEP_MODES[mode]
        if torch_mode not in seen:
            seen.add(torch_mode)
            out.append((f"llmopt compiled decode ({torch_mode or 'default'}){suffix}, {k} steps per CUDA graph",
                        {"compile": mode, "graph_steps": k}))
    return out


def model_label(model: str) -> str:
    """How a report names the model an experiment ran: "tiny", or the checkpoint folder's name."""
    return Path(model).name or str(model)


def check_bench_model(model: str) -> None:
    """Refuse, before any experiment runs, a model the bench cannot run (with load_model's reasons)."""
    from .draft import is_mlp_draft_folder
    from .load import resolve
    hf = json.loads((resolve(model) / "config.json").read_text())
    if is_mlp_draft_folder(hf):
        raise ValueError(f"{model!r} is an MLP draft, not a model to benchmark: give a target such as 'tiny' "
                         "or a Llama / Mistral / Qwen2 checkpoint folder")
    ModelConfig.from_hf(hf)                    # an architecture llmopt implements, or a clear error


def bench_baseline(quick: bool, device: str, model: str = "tiny",
                   text: str | None = None) -> dict:
    """llmopt vs transformers generate on the same checkpoint (`tiny` by default), batch 1, greedy."""
    from transformers import AutoModelForCausalLM
    from .load import load_model, resolve
    name, path = model_label(model), model
    model, tok = load_model(path, device=device)
    # safetensors only, in the dtype llmopt loaded (load_model has already refused pickled weights)
    hf = AutoModelForCausalLM.from_pretrained(resolve(path), use_safetensors=True,
                                              dtype=model.dtype).to(device).eval()
    new = 32 if quick else 128
    rows = compare_with_transformers(model, tok, hf, prompt=batch1_prompt(tok, text), new_tokens=new,
                                     repeats=2 if quick else 5, label=name, compiled=not quick)
    hf_row = rows[-1]
    best = max(rows[:-1], key=lambda r: r["decode_tokens_per_s"])
    ratios = {f"decode tokens/s, {r['label']} / transformers":
              r["decode_tokens_per_s"] / hf_row["decode_tokens_per_s"] for r in rows[:-1]}
    ratios["end-to-end tokens/s (prefill included), llmopt eager / transformers"] = (
        rows[0]["e2e_tokens_per_s"] / hf_row["e2e_tokens_per_s"])
    return {"name": "baseline", "title": f"llmopt vs transformers generate ({name}, batch 1, greedy, "
            f"{new} new tokens)", "rows": rows, "ratios": ratios,
            "goal": {f"decode tokens/s, {best['label']} / transformers": 2.0} if name == "tiny" else {},
            "extra_keys": ["first_call_s", "greedy_token_agreement"]}


def bench_cache(quick: bool, device: str, model: str = "tiny",
                text: str | None = None) -> dict:
    """Batch 1: the static KV cache vs recomputing the whole sequence every step."""
    from .load import load_model
    name = model_label(model)
    model, tok = load_model(model, device=device)
    prompt = eval_ids(tok, text, max_tokens=32).tolist()
    new = 64 if quick else 512
    rows = []
    for kind in ("none", "dynamic", "static", "paged"):
        rows.append(measure_generation(
            lambda: generate(model, tok, prompt, max_new_tokens=new, cache=kind, ignore_eos=True),
            repeats=1 if quick else 3, warmup=1, label=f"cache={kind}", model=name,
            device=device, dtype=str(model.dtype).removeprefix("torch.")))
    by = {r["label"]: r for r in rows}
    return {"name": "cache", "title": f"KV cache vs recompute ({name}, batch 1, 32-token prompt, {new} new tokens)",
            "rows": rows,
            "ratios": {"decode tokens/s, static cache / recompute":
                       by["cache=static"]["decode_tokens_per_s"] / by["cache=none"]["decode_tokens_per_s"],
                       "decode tokens/s, paged / static":
                       by["cache=paged"]["decode_tokens_per_s"] / by["cache=static"]["decode_tokens_per_s"]},
            "goal": {"decode tokens/s, static cache / recompute": 8.0} if name == "tiny" else {}}


def bench_attention(quick: bool, device: str, model: str = "tiny",
                    text: str | None = None) -> dict:
    """Prefill time (TTFT) of plain softmax attention vs SDPA at long prompts (`tiny`'s shape, random
    weights, by default; a checkpoint's own weights otherwise)."""
    from .load import load_model
    from .model import build_model
    from .profiling import measure
    name = model_label(model)
    if model == "tiny":
        model, label = build_model(get_config("tiny"), device=device), "tiny (random weights)"
    else:
        model, label = load_model(model, device=device)[0], name
    dtype = str(model.dtype).removeprefix("torch.")
    rows, ratios = [], {}
    for n in [n for n in ((256, 512) if quick else (1024, 2048)) if n <= model.config.max_seq_len]:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        times = {}
        for backend in ("plain", "sdpa"):
            model.set_attention(backend)
            with torch.inference_mode():
                t = measure(lambda: model(ids, last_only=True), warmup=1, repeats=2 if quick else 5,
                            device=device)["median"]
            times[backend] = t
            rows.append({"label": f"{backend} attention, prompt {n}", "model": label,
                         "device": device, "dtype": dtype, "prompt_len": n, "ttft_s": t,
                         "prefill_tokens_per_s": n / t})
        model.set_attention("sdpa")
        ratios[f"prefill time at {n} tokens, plain / SDPA"] = times["plain"] / times["sdpa"]
    return {"name": "attention", "title": f"SDPA vs plain attention, prefill ({name})", "rows": rows,
            "ratios": ratios, "metric": "prefill_tokens_per_s"}


def _random_shape(preset: str, quick: bool, device: str, dtype=torch.float32):
    """A real model's shape with random weights (speed only), cut to 2 layers in quick mode."""
    from .model import build_model
    cfg = get_config(preset)
    if quick:
        cfg = cfg.replace(n_layers=2)
    return build_model(cfg, device=device, dtype=dtype)


def bench_precision(quick: bool, device: str, model: str = "tiny",
                    text: str | None = None) -> dict:
    """Per dtype: decode tokens/s, peak memory, model bytes; perplexity change (`tiny` and a
    ~100M-parameter random-weight shape by default, or the checkpoint given)."""
    import warnings
    from .load import load_model
    from .metrics import perplexity
    from .precision import cast
    from .profiling import peak_memory
    from .quantize import model_bytes
    rows, ratios = [], {}
    new = 16 if quick else 64
    checkpoint = model
    for source in (("tiny", "llama-100m") if checkpoint == "tiny" else (model_label(checkpoint),)):
        base_ppl = None
        random = source == "llama-100m"
        for name in ("fp32", "bf16", "fp16"):
            if random:
                model, tok = _random_shape(source, quick, device), None
            else:
                model, tok = load_model(checkpoint, device=device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                cast(model, name)
            prompt = list(range(1, 33))
            run = lambda: generate(model, tok, prompt, max_new_tokens=new, ignore_eos=True)  # noqa: E731
            row = measure_generation(run, repeats=1 if quick else 3, label=f"{source} {name}",
                                     model=source + (" (random weights)" if random else ""),
                                     device=device, dtype=name)
            row["peak_mb"] = peak_memory(run, device=device)["peak_bytes"] / 1e6
            row["model_mb"] = model_bytes(model) / 1e6
            if not random:
                ids = eval_ids(tok, text, max_tokens=2048 if quick else 16384)
                row["perplexity"] = perplexity(model, ids=ids, context=256)
                base_ppl = base_ppl or row["perplexity"]
                row["perplexity_change"] = row["perplexity"] / base_ppl - 1
            rows.append(row)
        by = {r["label"]: r for r in rows}
        ratios[f"{source}: bf16 / fp32 decode tokens/s"] = (by[f"{source} bf16"]["decode_tokens_per_s"]
                                                           / by[f"{source} fp32"]["decode_tokens_per_s"])
    return {"name": "precision", "title": "Decode speed, memory and quality by dtype", "rows": rows,
            "ratios": ratios, "extra_keys": ["model_mb", "peak_mb", "perplexity", "perplexity_change"]}


def bench_compile(quick: bool, device: str, model: str = "tiny",
                  text: str | None = None) -> dict:
    """The compiled decode step vs eager, with the compile time beside the speed-up."""
    from .load import load_model
    name = model_label(model)
    model, tok = load_model(model, device=device)
    dtype = str(model.dtype).removeprefix("torch.")
    mode = "reduce-overhead" if device.startswith("cuda") else "default"
    new = 32 if quick else 256
    prompt = list(range(1, 33))
    eager = measure_generation(lambda: generate(model, tok, prompt, max_new_tokens=new, ignore_eos=True),
                               repeats=1 if quick else 3, label="eager", model=name, device=device,
                               dtype=dtype)
    t0 = time.perf_counter()
    first = generate(model, tok, prompt, max_new_tokens=new, ignore_eos=True, compile=mode)
    compile_s = time.perf_counter() - t0 - eager["e2e_s"]
    comp = measure_generation(lambda: generate(model, tok, prompt, max_new_tokens=new, ignore_eos=True,
                                               compile=mode),
                              repeats=1 if quick else 3, label=f"compiled ({mode})", model=name,
                              device=device, dtype=dtype)
    comp["compile_s"] = compile_s
    same = first.token_ids == generate(model, tok, prompt, max_new_tokens=new, ignore_eos=True).token_ids
    for r in (eager, comp):
        r["greedy_identical"] = same
    return {"name": "compile", "title": f"Compiled vs eager decode ({name}, batch 1, {new} new tokens)",
            "rows": [eager, comp],
            "ratios": {"decode tokens/s, compiled / eager": comp["decode_tokens_per_s"] / eager["decode_tokens_per_s"]},
            "extra_keys": ["compile_s", "greedy_identical"]}


QUANT_METHODS = (("fp32", None, {}), ("int8", "int8", {}), ("int4 g32", "int4", {"group_size": 32}),
                 ("int4 g64", "int4", {"group_size": 64}), ("int4 g128", "int4", {"group_size": 128}),
                 ("int4 g64 symmetric", "int4", {"group_size": 64, "symmetric": True}),
                 ("bf16 + int8", "bf16+int8", {}), ("bf16 + int4 g64", "bf16+int4", {"group_size": 64}))


def _quantized(model, method: str | None, **kw):
    """`model` as a quantization row names it: None (as is), "int8" / "int4", "bf16", "bf16+int8" /
    "bf16+int4" (bf16 activations: the fastest CPU decodes), or "dynamic" (torch's CPU W8A8)."""
    from .quantize import quantize, quantize_dynamic_cpu
    if method and method.startswith("bf16"):
        model, method = model.to(torch.bfloat16), method.removeprefix("bf16").removeprefix("+")
    if method == "dynamic":
        return quantize_dynamic_cpu(model)
    return quantize(model, method, **kw) if method else model


def bench_quantization(quick: bool, device: str, model: str = "tiny",
                       text: str | None = None) -> dict:
    """Weight-only quantization: bytes and held-out perplexity on `tiny` (or the checkpoint given);
    decode speed against `transformers` generate on a ~100M-parameter random-weight shape (or the
    checkpoint itself)."""
    import copy
    from .load import load_model
    from .metrics import compare_next_token, perplexity
    from .quantize import model_bytes
    name, path = model_label(model), model
    rows, ratios = [], {}
    ref, tok = load_model(path, device=device)
    ref_dtype = dtype_name(ref.dtype)    # tiny: fp32; a checkpoint as it was saved
    ids = eval_ids(tok, text, max_tokens=2048 if quick else 16384)
    ref_bytes, ref_ppl = model_bytes(ref), perplexity(ref, ids=ids, context=256)
    skipped = []
    for label, method, kw in QUANT_METHODS:
        label = ref_dtype if method is None else label
        try:
            model = _quantized(copy.deepcopy(ref), method, **kw)
        except ValueError as e:          # e.g. int4 groups that do not divide this model's widths
            skipped.append({"label": f"{name} {label}", "model": name, "device": device, "method": label,
                            "skipped": str(e)})
            continue
        ppl = perplexity(model, ids=ids, context=256)
        agree = compare_next_token(model, ref, ids[:1024], context=256)
        rows.append({"label": f"{name} {label}", "model": name, "device": device, "method": label,
                     "bytes_ratio": model_bytes(model) / ref_bytes, "perplexity": ppl,
                     "perplexity_change": ppl / ref_ppl - 1, **agree})
    by = {r["method"]: r for r in rows}
    for method in ("int8", "int4 g64"):
        if method in by:
            ratios[f"{name} {method} weight bytes / {ref_dtype}"] = by[method]["bytes_ratio"]
            ratios[f"{name} {method} perplexity change (fraction)"] = by[method]["perplexity_change"]

    # speed: a ~100M-parameter Llama shape (random weights) or the checkpoint, batch 1 decode
    if path == "tiny":
        speed_name = "llama-100m"
        fresh = lambda: _random_shape("llama-100m", quick, device)  # noqa: E731
    else:
        speed_name = name
        fresh = lambda: copy.deepcopy(ref)  # noqa: E731
    base = fresh()
    hf = to_transformers(base)
    prompt = list(range(1, 33))
    new = 16 if quick else 64
    reps = 1 if quick else 3
    base_dtype = dtype_name(base.dtype)
    variants = [(f"llmopt {base_dtype}", None, {}), ("llmopt bf16", "bf16", {}),
                ("llmopt int8 weight-only", "int8", {}),
                ("llmopt int8 weight-only, compiled", "int8", {"compile": True}),
                ("llmopt bf16 + int8 weight-only, compiled max-autotune", "bf16+int8",
                 {"compile": "max-autotune"}),
                # fused: the CPU int4 kernel in bf16 is fast at few rows, so this 32-token prompt's
                # prefill skips the reference path's dequantized copies (2-core Xeon: first token
                # 0.035 s against 0.24-0.30 s; decode runs the same frozen graph either way)
                ("llmopt bf16 + int4 g64 weight-only, compiled max-autotune", "bf16+int4",
                 {"compile": "max-autotune", "group_size": 64, "fused": True}),
                ("llmopt int4 g64 weight-only", "int4", {"group_size": 64})]
    if device == "cpu" and base_dtype == "fp32":
        variants.append(("llmopt + torch dynamic int8 (W8A8)", "dynamic", {}))
    if base_dtype == "bf16":             # the checkpoint is bf16 already
        variants = [v for v in variants if v[0] != "llmopt bf16"]
    runs = {f"transformers {base_dtype} generate":
            lambda: hf_generate(hf, torch.tensor([prompt], device=device), max_new_tokens=new)}
    ratios_bytes = {}
    for label, method, kw in variants:
        model = fresh()
        kw = dict(kw)
        compiled = kw.pop("compile", False)
        try:
            model = _quantized(model, method, **kw)
        except ValueError as e:
            skipped.append({"label": label, "model": speed_name, "device": device, "skipped": str(e)})
            continue
        ratios_bytes[label] = model_bytes(model) / model_bytes(base)
        runs[label] = lambda m=model, c=compiled: generate(m, None, prompt, max_new_tokens=new, ignore_eos=True,
                                                           compile=c)
    # interleaved: every variant sees the same drift of this machine's speed
    speed = measure_generations(runs, repeats=reps, model=speed_name + (" (random)" if path == "tiny" else ""))
    for row in speed[1:]:
        row["bytes_ratio"] = ratios_bytes[row["label"]]
    best = max(speed[1:], key=lambda r: r["decode_tokens_per_s"])
    speed_key = f"{speed_name} decode tokens/s, best llmopt ({best['label']}) / transformers {base_dtype}"
    ratios[speed_key] = best["decode_tokens_per_s"] / speed[0]["decode_tokens_per_s"]
    goal = {"tiny int8 weight bytes / fp32": "<= 0.27", "tiny int4 g64 weight bytes / fp32": "<= 0.16",
            speed_key: 4.0}
    if text is None:                     # the quality goals are set on the plays' test split
        goal.update({"tiny int8 perplexity change (fraction)": "<= 0.01",
                     "tiny int4 g64 perplexity change (fraction)": "<= 0.10"})
    return {"name": "quantization", "title": f"Weight-only quantization: size, quality, speed ({name})",
            "rows": rows + speed + skipped, "ratios": ratios, "goal": goal if path == "tiny" else {},
            "extra_keys": ["bytes_ratio", "perplexity", "perplexity_change", "top1_agreement",
                           "kl_divergence", "skipped"]}


def bench_batching(quick: bool, device: str, model: str = "tiny",
                   text: str | None = None) -> dict:
    """`tiny`, 8 slots: static vs dynamic vs continuous batching, all requests at time 0, output
    lengths uniform in 8-256 tokens (the workload issue #4's goals are set on)."""
    n, out = (16, (8, 64)) if quick else (64, (8, 256))
    res = _batching(quick, device, "uniform", n, out,
                    f"Batching strategies ({model_label(model)}, {n} requests, outputs {out[0]}-{out[1]} tokens, "
                    "8 slots)", model=model, text=text)
    if model == "tiny":
        res["goal"] = {"throughput, continuous / static batching": 1.5,
                       "throughput, continuous (longest first) / static batching": 1.5}
    return res


def bench_dialogue(quick: bool, device: str, model: str = "tiny",
                   text: str | None = None) -> dict:
    """The same comparison on dialogue turns: output lengths are the plays' speeches (long-tailed,
    median 18 tokens, the longest 392), the shape of chat traffic. Always the plays' turns: `text`
    is not read (the lengths of a text's speeches need the plays' layout)."""
    n, out = (16, (4, 64)) if quick else (64, (4, 512))
    return _batching(quick, device, "corpus", n, out,
                     f"Batching strategies on dialogue turns ({model_label(model)}, {n} requests, output lengths "
                     f"of the plays' speeches, {out[0]}-{out[1]} tokens, 8 slots"
                     f"{'; prompts from the plays, not your text' if text is not None else ''})",
                     name="dialogue", model=model)


def _batching(quick: bool, device: str, lengths: str, n: int, out: tuple[int, int], title: str,
              name: str = "batching", model: str = "tiny", text: str | None = None) -> dict:
    from .load import load_model
    from .workload import compare_batching, ideal_continuous_speedup, poisson_workload
    label = model_label(model)
    model, tok = load_model(model, device=device)
    work = poisson_workload(tok, n, seed=0, prompt_tokens=(16, 64), output_tokens=out, lengths=lengths,
                            text=text)
    # on a GPU also with CUDA graphs, static and continuous (on a CPU they run the same steps eagerly)
    rows = compare_batching(model, tok, work, slots=8, repeats=1 if quick else 5, gather_every_step=True,
                            prefill_alone=True, cuda_graphs=torch.device(device).type == "cuda")
    ideal = ideal_continuous_speedup([w.max_new_tokens for w in work], 8)
    for r in rows:
        r.update(model=label, device=device, dtype=str(model.dtype).removeprefix("torch."))
    graphed = {r["label"]: r["throughput_vs_static_graphs"] for r in rows if "throughput_vs_static_graphs" in r}
    return {"name": name, "metric": "tokens_per_s", "title": title, "rows": rows,
            "ratios": {**{f"throughput, {label} / static batching, CUDA graphs": v
                          for label, v in graphed.items() if label.startswith("continuous")},
                       "throughput, continuous / static batching": rows[2]["throughput_vs_static"],
                       "throughput, continuous (longest first) / static batching":
                       rows[3]["throughput_vs_static"],
                       "throughput, continuous / static, lowest of the repeats": rows[2]["throughput_vs_static_min"],
                       "throughput, continuous / static, highest of the repeats": rows[2]["throughput_vs_static_max"],
                       "throughput, continuous (KV blocks gathered once per batch change) / (gathered every step)":
                       rows[2]["throughput_vs_static"] / rows[4]["throughput_vs_static"],
                       "throughput, continuous (new prompts inside decode steps) / (each prefilled alone)":
                       rows[2]["throughput_vs_static"] / rows[5]["throughput_vs_static"],
                       "throughput, dynamic (length-aware) / static": rows[1]["throughput_vs_static"],
                       "decode steps, static / continuous (first come first served; the expected ratio)":
                       ideal["step_ratio"],
                       "decode steps, static / continuous longest first": ideal["longest_first_step_ratio"],
                       "decode steps, static / static with batches sorted by output length":
                       ideal["static_steps"] / ideal["static_longest_first_steps"],
                       "decode steps, static / (tokens / slots) (the bound with no tail)":
                       ideal["bound_ratio"]},
            "extra_keys": ["tokens_per_s", "wall_s", "forwards", "identical", "same_greedy", "throughput_vs_static",
                           "throughput_vs_static_min", "throughput_vs_static_max"]}


def _against_unbatched(model, tok, prompts: list, outputs: list[list[int]]) -> tuple[int, int]:
    """Each greedy output against its prompt's unbatched greedy one, as many tokens: (how many differ,
    how many of those part beyond a rounding tie, which is a fault; a tie in bf16 is not)."""
    partings = [greedy_divergence(model, prompt, generate(model, tok, prompt, max_new_tokens=len(ids),
                                                          ignore_eos=True).token_ids, ids)
                for prompt, ids in zip(prompts, outputs)]
    return sum(not d["identical"] for d in partings), sum(not (d["identical"] or d["tie"]) for d in partings)


def bench_load(quick: bool, device: str, model: str = "tiny",
               text: str | None = None) -> dict:
    """The engine under 16 client threads: throughput, latency percentiles, requests lost."""
    from .engine import Engine
    from .generate import generate
    from .load import load_model
    from .workload import poisson_workload, run_load, summarize_load
    name = model_label(model)
    model, tok = load_model(model, device=device)
    n = 64 if quick else 1000
    work = poisson_workload(tok, n, seed=0, prompt_tokens=(16, 64), output_tokens=(8, 64), text=text)
    with Engine(model, tok, max_batch_size=8) as engine:
        df = run_load(engine, work, clients=16, realtime=False, ignore_eos=True)
    summary = summarize_load(df, "continuous engine, 8 slots, 16 clients", submitted=n)
    ok = df[df["ok"]]
    mismatched, faults = _against_unbatched(model, tok, [w.prompt_ids for w in work], list(ok["token_ids"]))
    summary.update(model=name, device=device, dtype=str(model.dtype).removeprefix("torch."),
                   mismatched_vs_unbatched=mismatched, changed_beyond_a_tie=faults,
                   preemptions=engine.scheduler.preemptions)
    return {"name": "load", "metric": "tokens_per_s",
            "title": f"Engine under load ({name}, {n} requests from 16 client threads, closed loop)",
            "rows": [summary],
            "ratios": {"requests lost": summary["lost"], "requests failed": summary["failed"],
                       "outputs differing from unbatched greedy": mismatched,
                       "outputs differing from unbatched greedy, not at a rounding tie": faults,
                       "throughput (tokens/s)": summary["tokens_per_s"],
                       "e2e latency p50 (s)": summary["e2e_p50_s"],
                       "e2e latency p95 (s)": summary["e2e_p95_s"],
                       "e2e latency p99 (s)": summary["e2e_p99_s"]},
            "goal": {"requests lost": "== 0", "outputs differing from unbatched greedy, not at a rounding tie": "== 0"},
            "extra_keys": ["requests", "completed", "lost", "tokens_per_s", "e2e_p50_s", "e2e_p95_s",
                           "e2e_p99_s", "ttft_p50_s", "ttft_p99_s", "mismatched_vs_unbatched",
                           "changed_beyond_a_tie"]}


def bench_chunked(quick: bool, device: str, model: str = "tiny",
                  text: str | None = None) -> dict:
    """A long prompt arriving while requests decode (`workload.prefill_stall`): the running requests'
    longest gap between tokens and the long prompt's TTFT, one step per prompt against 128-token
    chunks (chunked prefill). Always the plays' held-out text (a long prompt needs 1,800 tokens)."""
    from .load import load_model
    from .workload import prefill_stall
    name = model_label(model)
    model, tok = load_model(model, device=device)
    running, long_tokens, new = (4, 600, 32) if quick else (8, 1800, 160)
    rows, faults = [], 0
    for label, chunked in (("one step per prompt", False), ("chunked prefill, 128 tokens a step", True)):
        r = prefill_stall(model, tok, running=running, long_prompt_tokens=long_tokens, max_new_tokens=new,
                          chunked_prefill=chunked, max_prefill_tokens=128, label=label)
        faults += _against_unbatched(model, tok, r["prompts"], r["token_ids"])[1]
        rows.append({k: v for k, v in r.items() if k not in ("token_ids", "prompts")} |
                    dict(model=name, device=device, dtype=str(model.dtype).removeprefix("torch.")))
    off, on = rows
    return {"name": "chunked", "metric": "max_gap_s",
            "title": f"A {off['long_prompt_tokens']}-token prompt arriving while {running} requests decode ({name})",
            "rows": rows,
            "ratios": {"longest token gap of a running request, one step / chunked": off["max_gap_s"] / on["max_gap_s"],
                       "long prompt TTFT, chunked / one step": on["long_ttft_s"] / off["long_ttft_s"],
                       "outputs differing from unbatched greedy, not at a rounding tie": faults},
            "goal": {"outputs differing from unbatched greedy, not at a rounding tie": "== 0"},
            "extra_keys": ["max_gap_s", "p99_gap_s", "median_gap_s", "long_ttft_s", "max_step_prefill_tokens"]}


def bench_speculative(quick: bool, device: str, model: str = "tiny",
                      text: str | None = None) -> dict:
    """`tiny` target, greedy, k=4: tiny-draft (the MLP draft), the transformer draft and model-free
    drafts against plain decoding (another checkpoint: the model-free drafts, which need no training).

    The n-gram table learns from the plays' training split and the prompt is Romeo's line; with
    your `text`, the table learns from its first 90% of tokens and the prompt is the 32 after them
    (so the table has not seen the text the target continues)."""
    from .data import load_text
    from .load import load_model
    from .speculative import NGramDraft, PromptLookup, speculative_generate
    name, path = model_label(model), model
    target, tok = load_model(path, device=device)
    if text is None:
        table, prompt = NGramDraft.from_text(tok, load_text("train")), DEFAULT_PROMPT
    else:
        learn, rest = split_text(tok, text)
        table, prompt = NGramDraft.from_ids(learn), rest[:32]
    new = 32 if quick else 128
    drafts = {}
    if path == "tiny":                  # drafts trained for tiny's tokenizer
        drafts["tiny-draft (MLP)"] = load_model("tiny-draft", device=device)[0]
        drafts["tiny-draft-llama (transformer)"] = load_model("tiny-draft-llama", device=device)[0]
    drafts.update({"prompt lookup": "lookup", "n-gram table": table,
                   "prompt lookup + n-gram": PromptLookup(fallback=table)})
    runs = {"plain decoding": lambda: generate(target, tok, prompt, max_new_tokens=new, ignore_eos=True)}
    for label, d in drafts.items():
        runs[f"speculative, {label}"] = (lambda d=d: speculative_generate(
            target, d, tok, prompt, k=4, max_new_tokens=new, ignore_eos=True))
    rows = measure_generations(runs, warmup=1, repeats=1 if quick else 5, model=name, device=device,
                               dtype=str(target.dtype).removeprefix("torch."))
    reference = runs["plain decoding"]().token_ids
    for row in rows[1:]:
        g = runs[row["label"]]()
        row.update({key: g.stats[key] for key in ("acceptance_rate", "tokens_per_target_forward",
                                                  "expected_tokens_per_round", "draft_cost_ratio",
                                                  "expected_speedup")},
                   identical=g.token_ids == reference)
    for row in rows:
        row["speedup"] = row["e2e_tokens_per_s"] / rows[0]["e2e_tokens_per_s"]
    by = {r["label"]: r for r in rows}
    head = "tiny-draft (MLP)" if path == "tiny" else "prompt lookup + n-gram"
    tpf = "tokens per target forward, tiny-draft k=4" if path == "tiny" else f"tokens per target forward, {head} k=4"
    wall = "end-to-end tokens/s, speculative (tiny-draft) / plain"
    ratios = {tpf: by[f"speculative, {head}"]["tokens_per_target_forward"]}
    if path == "tiny":
        ratios[wall] = by[f"speculative, {head}"]["speedup"]
    for label in drafts:
        if label != "tiny-draft (MLP)":
            ratios[f"end-to-end tokens/s, speculative ({label}) / plain"] = by[f"speculative, {label}"]["speedup"]
    return {"name": "speculative", "metric": "e2e_tokens_per_s",
            "title": f"Speculative decoding ({name} target, k=4, greedy, {new} new tokens)", "rows": rows,
            "ratios": ratios, "goal": {tpf: 2.0, wall: 1.2} if path == "tiny" and text is None else {},
            "extra_keys": ["acceptance_rate", "tokens_per_target_forward", "draft_cost_ratio",
                           "expected_speedup", "speedup", "identical"]}


def bench_speculative_engine(quick: bool, device: str, model: str = "tiny",
                             text: str | None = None, cuda_graphs: bool = False) -> dict:
    """Speculative decoding inside the continuous-batching engine as the batch grows
    (`workload.speculation_by_batch`): k=4, greedy, the engine with and without drafts at batch
    1, 4 and 16 (quick: 1 and 4). Drafts: prompt lookup, and with `tiny` its MLP and transformer drafts. Prompts
    from the plays' held-out text (the engine's own prompts; `text` is not used here). With
    `cuda_graphs`, both engines run their steps as CUDA graphs (the GPU suite)."""
    from .load import load_model
    from .workload import speculation_by_batch
    name, path = model_label(model), model
    target, tok = load_model(path, device=device)
    drafts = {"prompt lookup": "lookup"}
    if path == "tiny":
        drafts = {"tiny-draft (MLP)": load_model("tiny-draft", device=device)[0],
                  "tiny-draft-llama (transformer)": load_model("tiny-draft-llama", device=device)[0], **drafts}
    sizes, new = ((1, 4), 16) if quick else ((1, 4, 16), 64)
    rows = []
    for label, d in drafts.items():
        for r in speculation_by_batch(target, tok, d, sizes=sizes, k=4, max_new_tokens=new,
                                      repeats=1 if quick else 3, label=label, cuda_graphs=cuda_graphs):
            rows.append(dict(r, label=f"{label}, batch {r['batch_size']}" + (", CUDA graphs" if cuda_graphs else ""),
                             draft=label, model=name, device=device, dtype=str(target.dtype).removeprefix("torch.")))
    ratios = {f"engine tokens/s with / without speculation, {r['label']}": r["speedup"] for r in rows}
    ratios["batches whose outputs differ with speculation"] = sum(not r["identical"] for r in rows)
    return {"name": "speculative_engine", "metric": "speedup",
            "title": f"Speculation in the engine as the batch grows ({name}, k=4, greedy, {new} new tokens a request)",
            "rows": rows, "ratios": ratios, "goal": {"batches whose outputs differ with speculation": "== 0"},
            "extra_keys": ["batch_size", "plain_tokens_per_s", "speculative_tokens_per_s", "speedup",
                           "acceptance_rate", "plain_forwards_per_token", "speculative_forwards_per_token",
                           "identical"]}


def bench_parallel(quick: bool, device: str, model: str = "tiny",
                   text: str | None = None) -> dict:
    """torchrun with 2 processes (gloo on CPU, NCCL on GPUs): tensor and data parallel vs one process."""
    from .load import resolve
    from .parallel import check_tensor_parallel, launch
    new = 16 if quick else 64
    name = model_label(model)
    if text is None:
        prompts = [DEFAULT_PROMPT, "KING:\nNow", "JULIET:", "HAMLET:"] * (1 if quick else 4)
    else:                                # 4 (16) spans of your text, as text
        from .load import load_tokenizer
        tok = load_tokenizer(model)
        prompts = [tok.decode(p) for p in prompt_spans(tok.encode(text), 4 if quick else 16)]
    try:                                 # a model whose heads do not split in two gets data parallel only
        check_tensor_parallel(ModelConfig.from_hf(json.loads((resolve(model) / "config.json").read_text())), 2)
        tp = launch("tensor", 2, model=model, max_new_tokens=new, prompts=prompts[:1])
        tp_skipped = None
    except ValueError as e:
        tp, tp_skipped = None, str(e)
    dp1 = launch("data", 1, model=model, max_new_tokens=new, prompts=prompts)
    dp2 = launch("data", 2, model=model, max_new_tokens=new, prompts=prompts)
    rows = [dict(label="1 process", tokens_per_s=dp1["tokens_per_s"]),
            dict(label="tensor parallel, 2 ranks", skipped=tp_skipped),
            dict(label="data parallel, 2 ranks", tokens_per_s=dp2["tokens_per_s"],
                 identical=dp2["outputs"] == dp1["outputs"])]
    ratios = {"throughput, data parallel 2 ranks / 1 process": dp2["tokens_per_s"] / dp1["tokens_per_s"]}
    if tp is not None:
        rows[0]["tpot_s"] = tp["single_tpot_s"]
        rows[1] = dict(label="tensor parallel, 2 ranks", tpot_s=tp["tpot_s"], comm_share=tp["comm_share"],
                       comm_s_per_token=tp["comm_s_per_token"], max_abs_logit_diff=tp["max_abs_logit_diff"],
                       identical=tp["tokens_equal"], same_greedy=tp["same_greedy"])
        ratios = {"per-token time, tensor parallel 2 ranks / 1 process": tp["tpot_s"] / tp["single_tpot_s"],
                  "communication share of the tensor-parallel token time": tp["comm_share"], **ratios}
    for r in rows:
        r.update(model=name, device=dp1["devices"][0])
    return {"name": "parallel", "metric": "tokens_per_s" if tp is None else "tpot_s",
            "title": f"Parallel generation ({name}, 2 processes, 1 thread each, {new} new tokens)", "rows": rows,
            "ratios": ratios, "extra_keys": ["tokens_per_s", "comm_share", "comm_s_per_token", "max_abs_logit_diff",
                                             "identical", "same_greedy", "skipped"]}


def bench_evaluation(quick: bool, device: str, model: str = "tiny",
                     text: str | None = None) -> dict:
    """The scoreboard: quality beside speed for every technique on `tiny` or the checkpoint (notebook 11)."""
    from .evaluate import scoreboard, workbook_variants
    from .load import load_model
    from .profiling import probe_bandwidth
    name = model_label(model)
    model, tok = load_model(model, device=device)
    n, new, eval_tokens = (2, 16, 1024) if quick else (8, 96, 8192)
    if text is None:
        prompt_ids, ngram_text = eval_ids(tok, None, max_tokens=n * 400), None
    else:      # as in the speculative experiment: the n-gram draft learns from text before the prompts
        learn, prompt_ids = split_text(tok, text)
        ngram_text = tok.decode(learn)
    prompts = [tok.decode(p) for p in prompt_spans(prompt_ids, n)]
    variants = workbook_variants(model, tok, new_tokens=new, ngram_text=ngram_text)
    rows = scoreboard(variants, tok, prompts, baseline=next(iter(variants)), eval_tokens=eval_tokens,
                      bandwidth=probe_bandwidth(device, nbytes=64 * 2**20), text=text)
    for r in rows:
        r.update(label=r["technique"], model=name, device=device)
    by = {r["technique"]: r for r in rows}
    return {"name": "evaluation", "metric": "speedup",
            "title": f"Scoreboard: quality and speed of every technique ({name}, {n} prompts x {new} tokens, "
                     f"{eval_tokens} test tokens)", "rows": rows,
            "ratios": {f"{k}: decode speed vs the {rows[0]['technique']}": v["speedup"] for k, v in by.items()} | {
                f"{k}: perplexity change": v["perplexity_change"] for k, v in by.items()},
            "extra_keys": ["perplexity", "perplexity_change", "top1_agreement", "kl_divergence", "distinct_2",
                           "type_token_ratio", "repetition_rate", "relevance_nats", "speedup", "peak_memory_mb",
                           "model_bytes", "mbu"]}


EXPERIMENTS = {"baseline": bench_baseline, "cache": bench_cache, "attention": bench_attention,
               "precision": bench_precision, "compile": bench_compile, "quantization": bench_quantization,
               "batching": bench_batching, "dialogue": bench_dialogue, "load": bench_load, "chunked": bench_chunked,
               "speculative": bench_speculative, "speculative_engine": bench_speculative_engine,
               "parallel": bench_parallel, "evaluation": bench_evaluation}


def _markdown_table(rows: list[dict], keys: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |\n" for r in rows)


def run_bench(only: list[str] | None = None, *, quick: bool = False, out: str | Path | None = None,
              device: str | None = None, model: str = "tiny", text: str | Path | None = None) -> dict:
    """Run the suite (all experiments or `only`), print ratios, write the report folder.

    `model`: "tiny" (the default, the workbook's figures) or your own Llama / Mistral / Qwen2
    checkpoint folder (what `load_model` takes): every experiment then runs on it, against
    `transformers` on the same weights where it has a baseline. The goals are `tiny`'s only.

    `text`: a UTF-8 file of your own text (at least 128 tokens; its first million characters are
    read). Perplexity and next-token agreement are scored on it instead of the plays' held-out
    test split, and prompts (batch 1, batching, load, parallel, the scoreboard, speculation) are
    cut from it; the dialogue experiment keeps the plays' turns.
    """
    from tqdm.auto import tqdm
    names = only or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    model = str(model)
    check_bench_model(model)
    if text is not None:
        from .load import load_tokenizer
        text_path, text = str(text), read_bench_text(text)
        text_tokens = check_bench_text(text, load_tokenizer(model), where=f"text file {text_path}")
    device = str(check_device(device or "auto"))
    out = Path(out or Path("reports") / time.strftime("bench-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    results = {"device": info, "quick": quick, "model": model, "experiments": []}
    if text is not None:
        results["text"] = {"path": text_path, "tokens": text_tokens}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    md = [f"# llmopt bench\n\nModel: **{model_label(model)}**{'' if model == 'tiny' else f' ({model})'}. "
          f"Device: **{info['device_name']}** ({info['device']}), torch "
          f"{info['torch']}, {info['threads']} threads{', quick mode' if quick else ''}.\n"]
    if text is not None:
        md.append(f"Text: **{text_path}** ({text_tokens:,} tokens): perplexity and agreement are scored on "
                  "it, and prompts are cut from it.\n")
    for name in tqdm(names, desc="bench"):
        res = EXPERIMENTS[name](quick, device, model, text)
        results["experiments"].append(res)
        keys = [k for k in ("label", "model", "dtype", "prompt_len", "ttft_s", "tpot_s",
                            "decode_tokens_per_s", "prefill_tokens_per_s", "e2e_tokens_per_s",
                            "new_tokens", *res.get("extra_keys", [])) if any(k in r for r in res["rows"])]
        md.append(f"## {res['title']}\n\n" + _markdown_table(res["rows"], keys))
        for k, v in res["ratios"].items():
            goal = res.get("goal", {}).get(k)
            goal_txt = "" if goal is None else (f" (goal >= {goal}x)" if isinstance(goal, float)
                                                else f" (goal {goal})")
            md.append(f"- {k}: **{v:.3g}**{goal_txt}")
            print(f"[{name}] {k}: {v:.3g}{goal_txt}")
        md.append("")
        _plot(res, out / f"{name}.png")
        md.append(f"![{name}]({name}.png)\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "report.md").write_text("\n".join(md))
    print(f"report written to {out}/report.md")
    return results


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    metric = res.get("metric", "decode_tokens_per_s")
    labels = [r["label"] for r in res["rows"]]
    ax.barh(labels, [r.get(metric, 0) for r in res["rows"]], color="tab:blue")
    ax.set_xlabel(f"{metric} (median)")
    ax.set_title(res["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
