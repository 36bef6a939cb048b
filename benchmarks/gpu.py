"""The prepared GPU suite: one call on a lent card, a few minutes (issue: GPU figures).

    bash benchmarks/gpu.sh                # on a GPU: full sizes, writes $OUT or results/gpu-<card>-<date>
    python benchmarks/gpu.py --smoke      # CPU smoke mode (CI runs this so the script never rots)

Writes `gpu_results.json` (every figure, with device and versions) and `gpu_results.md`, both rewritten after
every section (a run stopped by its time limit keeps what it measured);
`python benchmarks/gpu.py --render results/.../gpu_results.json` writes a saved run's markdown again.
Speed runs use real shapes with random weights (labelled so); timing depends on shapes, not values.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import llmopt  # noqa: E402
from llmopt.bench import (compare_with_transformers, decode_bytes_per_token,  # noqa: E402
                          graph_variants, to_transformers)
from llmopt.profiling import device_info, probe_bandwidth, probe_matmul  # noqa: E402


def section(results: dict, name: str, fn) -> None:
    """Run one part of the suite; a failure is recorded, never fatal for the rest."""
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # a missing backend or an OOM must not lose the other figures
        partial = results.get(name) if isinstance(results.get(name), dict) else {}   # rows saved so far
        results[name] = {**partial, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    results[name + "_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[{name}] {json.dumps(results[name], default=str)[:600]}", flush=True)


def goals(results: dict) -> list[dict]:
    """The issue's four goals on one H100, each against what this run measured (None: not run).
    Compiled rows are the llmopt rows with "compiled" in their label; int8 is compared with the
    fastest bf16 compiled row, fused projections included (the stricter comparison)."""
    def rows(key):
        part = results.get(key)
        return [r for r in part.get("rows", []) if "error" not in r] if isinstance(part, dict) else []

    def best(rs, field="decode_tokens_per_s"):
        return max(rs, key=lambda r: r[field]) if rs else None

    decode = rows("decode_batch1")
    compiled = best([r for r in decode if "compiled" in r["label"] and not r["label"].startswith("transformers")])
    hf = next((r for r in decode if r["label"].startswith("transformers")), None)
    int8 = best([r for r in rows("quantized_decode") if r["label"].startswith("int8") and "compiled" in r["label"]])
    out = [
        dict(goal="decode MBU (batch 1, bf16, compiled)", target=0.70, unit="",
             measured=compiled.get("mbu") if compiled else None, row=compiled and compiled["label"]),
        dict(goal="llmopt compiled decode / transformers eager generate", target=3.0, unit="x",
             measured=compiled["decode_tokens_per_s"] / hf["decode_tokens_per_s"] if compiled and hf else None,
             row=compiled and compiled["label"]),
        dict(goal="int8 weight-only / bf16, both compiled", target=1.4, unit="x",
             measured=int8["decode_tokens_per_s"] / compiled["decode_tokens_per_s"] if int8 and compiled else None,
             row=int8 and f"{int8['label']} / {compiled['label']}"),
    ]
    for key, what in (("batching_dialogue", "dialogue turns"), ("batching", "outputs uniform")):
        # like for like: eager continuous against eager static, and (where run) both with CUDA graphs
        cont = [r for r in rows(key) if r["label"].startswith("continuous") and "CUDA graphs" not in r["label"]]
        graphed = [r for r in rows(key) if r["label"].startswith("continuous") and "CUDA graphs" in r["label"]]
        for r, field, how in [(next((r for r in cont if r["label"] == "continuous batching"), None),
                               "throughput_vs_static", ""),
                              (best(cont, "throughput_vs_static"), "throughput_vs_static", ""),
                              (best(graphed, "throughput_vs_static_graphs"), "throughput_vs_static_graphs",
                               ", both with CUDA graphs")]:
            if r is not None and not any(g.get("row") == f"{key}: {r['label']}" for g in out):
                out.append(dict(goal=f"continuous / static batching throughput, {what}{how}", target=3.0,
                                unit="x", measured=r[field], row=f"{key}: {r['label']}"))
    for g in out:
        g["met"] = None if g["measured"] is None else g["measured"] >= g["target"]
    return out


def _graph_note(row: dict) -> str:
    """What an engine with CUDA graphs did, for a batching table ("" for the other rows)."""
    if row.get("graph_error"):
        return f"recording failed, ran eagerly: {row['graph_error'][:80]}"
    if "graph_steps" not in row:
        return ""
    return (f"{row['graphs_recorded']} recorded, {row['graph_replays']} of {row['graph_steps']} steps "
            f"replayed; first repeat {row['first_wall_s']:.2f} s")


def render(results: dict) -> str:
    """The markdown report of a results dict (also of a run cut by its time limit: what it measured)."""
    info = results["device"]
    preset, new_tokens = results.get("preset", "llama-3.2-1b"), results.get("new_tokens", 256)
    md = [f"# GPU suite: {info['device_name']}", "",
          f"{results['date']}, torch {info['torch']}, transformers {results['transformers']}"
          f"{', Inductor coordinate-descent tuning' if results['coordinate_descent_tuning'] else ''}"
          f"{' (CPU smoke mode)' if results['smoke'] else ''}.", ""]
    pr = results.get("probes", {})
    if pr and "error" not in pr:
        md.append(f"- copy bandwidth: {pr['copy_bandwidth_GBps']:.1f} GB/s; matmul "
                  f"({pr['matmul_dtype']}): {pr['matmul_TFLOPs']:.1f} TFLOP/s")
    md.append(f"- sections: " + ", ".join(f"{k[:-8]} {v:.0f} s" for k, v in results.items()
                                           if k.endswith("_seconds"))
              + (f"; {results['elapsed_s']:.0f} s in all" if "elapsed_s" in results else ""))

    def table(title: str, columns: list[str], rows: list[list]) -> None:
        md.extend(["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)])
        md.extend("| " + " | ".join(map(str, row)) + " |" for row in rows)

    fmt = lambda g, v: f"{v:.0%}" if g["unit"] == "" else f"{v:.2f}{g['unit']}"  # noqa: E731
    table("Goals (issue: GPU figures, one H100):", ["goal", "target", "measured", "met", "row"],
          [[g["goal"], fmt(g, g["target"]), "not run" if g["measured"] is None else fmt(g, g["measured"]),
            {True: "yes", False: "**no**", None: "-"}[g["met"]], g["row"] or ""] for g in goals(results)])
    mbu = lambda r: f"{r.get('mbu', float('nan')):.0%}"  # noqa: E731
    failed = lambda r, n: [r["label"], f"failed: {r['error'][:200]}"] + [""] * (n - 2) if "error" in r else None  # noqa: E731
    dec = results.get("decode_batch1", {})
    if "rows" in dec:
        table(f"Decode, batch 1, greedy, {new_tokens} new tokens, {preset} shape with random weights:",
              ["path", "decode tokens/s", "TPOT ms", "TTFT ms", "MBU"],
              [failed(r, 5) or [r["label"], f"{r['decode_tokens_per_s']:.1f}", f"{r['tpot_s'] * 1e3:.2f}",
                                f"{r['ttft_s'] * 1e3:.1f}", mbu(r)] for r in dec["rows"]])
        md.append(f"\nbest llmopt / transformers: **{dec['ratio_llmopt_over_transformers']:.2f}x**")
    q = results.get("quantized_decode", {})
    if "rows" in q:
        table("Weight-only quantization, same shape and decode:",
              ["path", "decode tokens/s", "TPOT ms", "bytes vs full", "MBU"],
              [failed(r, 5) or [r["label"], f"{r['decode_tokens_per_s']:.1f}", f"{r['tpot_s'] * 1e3:.2f}",
                                f"{r['bytes_ratio']:.2f}", mbu(r)] for r in q["rows"]])
    bnb = results.get("bitsandbytes", {})
    if "rows" in bnb:
        table(f"bitsandbytes through transformers (eager generate), same shape, {bnb['rows'][0]['new_tokens']} new tokens:",
              ["path", "decode tokens/s", "TPOT ms"],
              [[r["label"], f"{r['decode_tokens_per_s']:.1f}", f"{r['tpot_s'] * 1e3:.2f}"] for r in bnb["rows"]])
    elif "skipped" in bnb:
        md.append(f"\n- bitsandbytes: skipped ({bnb['skipped']})")
    a = results.get("attention_prefill", {})
    if "rows" in a:
        table("Prefill (TTFT), plain vs SDPA attention:", ["backend", "prompt", "TTFT ms", "peak GB"],
              [[r["backend"], r["prompt_len"], "OOM" if r["ttft_s"] is None else f"{r['ttft_s'] * 1e3:.1f}",
                f"{r['peak_gb']:.2f}" if isinstance(r["peak_gb"], float) else r["peak_gb"]] for r in a["rows"]])
    for key, what in (("batching", "outputs uniform"), ("batching_dialogue", "dialogue turns")):
        b = results.get(key, {})
        if "rows" in b:
            table(f"Batching (tiny, {b['rows'][0]['requests']} requests, {what}, {b['slots']} slots; fewer decode "
                  f"steps with continuous: {b['ideal']['step_ratio']:.2f}x, longest first "
                  f"{b['ideal']['longest_first_step_ratio']:.2f}x):",
                  ["strategy", "tokens/s", "vs static (range)", "vs static with CUDA graphs", "forwards",
                   "outputs identical", "CUDA graphs"],
                  [[r["label"], f"{r['tokens_per_s']:.0f}", f"{r['throughput_vs_static']:.2f}x "
                    f"({r['throughput_vs_static_min']:.2f}-{r['throughput_vs_static_max']:.2f})",
                    f"{r['throughput_vs_static_graphs']:.2f}x" if "throughput_vs_static_graphs" in r else "",
                    r["forwards"], r["identical"], _graph_note(r)] for r in b["rows"]])
    st = results.get("prefill_stall", {})
    if "rows" in st:
        table(f"A {st['long_prompt_tokens']}-token prompt arriving while {st['running']} requests decode (tiny): "
              "the running requests' gaps between tokens, and the long prompt's first token:",
              ["engine", "longest gap ms", "p99 gap ms", "median gap ms", "long prompt TTFT ms",
               "most prompt tokens in a step"],
              [[r["label"], f"{r['max_gap_s'] * 1e3:.1f}", f"{r['p99_gap_s'] * 1e3:.1f}",
                f"{r['median_gap_s'] * 1e3:.2f}", f"{r['long_ttft_s'] * 1e3:.1f}", r["max_step_prefill_tokens"]]
               for r in st["rows"]])
    sp = results.get("speculative", {})
    if "rows" in sp:
        table(f"{sp['title']}:", ["path", "tokens/s", "vs plain", "tokens per target forward", "outputs identical"],
              [[r["label"], f"{r['e2e_tokens_per_s']:.0f}", f"{r['speedup']:.2f}x",
                "" if r["tokens_per_target_forward"] is None else f"{r['tokens_per_target_forward']:.2f}",
                "" if r["identical"] is None else r["identical"]] for r in sp["rows"]])
    se = results.get("speculative_engine", {})
    if "rows" in se:
        table(f"{se['title']}:", ["draft, batch", "tokens/s plain", "tokens/s speculative", "speed-up",
                                  "acceptance", "forwards a token", "outputs identical"],
              [[r["label"], f"{r['plain_tokens_per_s']:.0f}", f"{r['speculative_tokens_per_s']:.0f}",
                f"{r['speedup']:.2f}x", f"{r['acceptance_rate']:.2f}", f"{r['speculative_forwards_per_token']:.3f}",
                r["identical"]] for r in se["rows"]])
    for k, v in results.items():
        if isinstance(v, dict) and "error" in v:
            md.append(f"\n- {k} failed: {v['error']}")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, seconds")
    p.add_argument("--out", default=None)
    p.add_argument("--preset", default="llama-3.2-1b", help="shape for the random-weight runs")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--only", default=None, help="comma-separated sections, e.g. decode_batch1,quantized_decode")
    # max-autotune was slower than reduce-overhead for this decode on an H100 (2.15 vs 1.69 ms a
    # token, 68 s to compile; results/gpu-NVIDIA-H100-80GB-HBM3-2026-11-27): not run by default
    p.add_argument("--modes", default="reduce-overhead",
                   help="torch.compile modes for the compiled decode rows (GPU), comma-separated")
    p.add_argument("--sync-every", type=int, default=16, help="the rows that read tokens back every k steps")
    p.add_argument("--graph-steps", type=int, default=16, help="decode steps per CUDA graph in the DecodeGraph rows")
    p.add_argument("--int4", action="store_true", help="also time int4 g64 in the quantized section (GPU)")
    p.add_argument("--render", metavar="JSON", help="only write the markdown of a saved gpu_results.json beside it")
    args = p.parse_args(argv)
    if args.render:
        saved = Path(args.render)
        report = render(json.loads(saved.read_text()))
        (saved.parent / (saved.stem + ".md")).write_text(report)
        print(report)
        return 0
    started = time.perf_counter()

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    info = device_info(device)
    card = info["device_name"].replace(" ", "-").replace("/", "-")
    out = Path(args.out or f"results/gpu-{card}-{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    import torch._inductor.config as inductor
    results: dict = {"device": info, "smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "transformers": __import__("transformers").__version__,
                     # TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 tunes each Triton kernel's launch config
                     "coordinate_descent_tuning": inductor.coordinate_descent_tuning}
    preset = "tiny" if args.smoke else args.preset
    new_tokens = 8 if args.smoke else args.new_tokens
    results.update(preset=preset, new_tokens=new_tokens)
    repeats = 1 if args.smoke else 3
    modes = () if args.smoke else tuple(args.modes.split(","))

    def save() -> None:
        """The JSON and the markdown, rewritten after every section: a run cut by its limit keeps both."""
        results["goals"] = goals(results)
        results["elapsed_s"] = round(time.perf_counter() - started, 1)
        (out / "gpu_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "gpu_results.md").write_text(render(results))

    section(results, "probes", lambda: {
        "copy_bandwidth_GBps": probe_bandwidth(device, nbytes=(32 if args.smoke else 1024) * 2**20) / 1e9,
        "matmul_TFLOPs": probe_matmul(device, dtype, n=512 if args.smoke else 8192) / 1e12,
        "matmul_dtype": str(dtype)})

    def timed_row(model, label, opts, prompt, reference=None):
        """One generate path's row (its first call, the compile, timed apart); a path that fails
        gives a row with its error, and the section goes on."""
        run = lambda: llmopt.generate(model, None, prompt, max_new_tokens=new_tokens,  # noqa: E731
                                      ignore_eos=True, **opts)
        try:
            t0 = time.perf_counter()
            tokens = run().token_ids
            first_call_s = time.perf_counter() - t0
            row = llmopt.measure_generation(run, repeats=repeats, label=label, model=f"{preset} (random weights)")
        except Exception as e:
            print(traceback.format_exc()[-2000:], flush=True)
            return {"label": label, "error": f"{type(e).__name__}: {e}"}
        row["first_call_s"] = first_call_s
        if reference is not None:
            row["greedy_token_agreement"] = sum(a == b for a, b in zip(tokens, reference)) / len(reference)
        return row

    def decode_vs_transformers():
        cfg = llmopt.get_config(preset)
        model = llmopt.build_model(cfg, device=device, dtype=dtype)
        hf = to_transformers(model)
        prompt = torch.randint(0, cfg.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
        rows = compare_with_transformers(model, None, hf, prompt=prompt, new_tokens=new_tokens,
                                         repeats=repeats, label=f"{preset} (random weights)",
                                         compiled=modes, sync_every=args.sync_every)
        del hf
        eager = llmopt.generate(model, None, prompt, max_new_tokens=new_tokens, ignore_eos=True).token_ids
        # k decode steps per CUDA graph that llmopt records and replays (DecodeGraph): one launch and
        # one read per k tokens, where reduce-overhead still runs the host's loop for every step
        for label, opts in graph_variants(modes, args.graph_steps):
            rows.insert(len(rows) - 1, timed_row(model, label, opts, prompt, eager))   # transformers stays last
        del model
        # the same weights with q, k, v and gate, up fused into one matmul each (fewer, larger
        # kernels; llmopt.fuse_projections), on the graph path
        fused = llmopt.fuse_projections(llmopt.build_model(cfg, device=device, dtype=dtype))
        for label, opts in graph_variants(modes, args.graph_steps, ", fused projections"):
            rows.insert(len(rows) - 1, timed_row(fused, label, opts, prompt, eager))
        if device == "cuda":    # and llmopt's Triton decode attention in every layer (kernels.decode_attention)
            fused.set_attention("triton")
            for label, opts in graph_variants(modes, args.graph_steps, ", fused projections, Triton decode attention"):
                rows.insert(len(rows) - 1, timed_row(fused, label, opts, prompt, eager))
            # and each layer's norms, SwiGLU and residual adds folded into llmopt's Triton GEMV, which then
            # runs the bf16 weights instead of cuBLAS (llmopt.fold_layers; the step is recorded again)
            llmopt.fold_layers(fused)
            for suffix, dependent in launches(", fused projections, folded layers, Triton decode attention"):
                with launched(dependent):
                    for label, opts in graph_variants(modes, args.graph_steps, suffix):
                        rows.insert(len(rows) - 1, timed_row(fused, label, opts, prompt, eager))
        del fused
        add_mbu(rows, cfg, dtype)
        ok = [r for r in rows[:-1] if "error" not in r]
        return {"rows": rows, "ratio_llmopt_over_transformers":
                max(r["decode_tokens_per_s"] for r in ok) / rows[-1]["decode_tokens_per_s"]}

    def launches(suffix: str) -> list[tuple[str, bool | None]]:
        """(label suffix, dependent launch) for a row whose every layer runs llmopt's kernels: where they
        launch as programmatic dependent launches (Hopper), that row, then the same launched plainly
        (what they buy, on a graph recorded again; `kernels.set_dependent_launch`)."""
        if not llmopt.kernels.dependent_launch(device):
            return [(suffix, None)]
        return [(f"{suffix}, dependent launches", True), (f"{suffix}, plain launches", False)]

    def launched(dependent: bool | None):
        """llmopt's kernels launched as dependent launches or not for a while (None: as they are)."""
        return contextlib.nullcontext() if dependent is None else llmopt.kernels.dependent_launches(dependent)

    def add_mbu(rows, cfg, dtype, bytes_scale=1.0):
        bw = results.get("probes", {}).get("copy_bandwidth_GBps")
        for r in rows:
            if "error" in r:
                continue
            step = decode_bytes_per_token(cfg, dtype, context=32 + new_tokens // 2) * bytes_scale
            r["bytes_per_step"] = step
            if bw:
                r["mbu"] = step * r["decode_tokens_per_s"] / (bw * 1e9)

    def quantized_decode():
        from llmopt.quantize import model_bytes, quantize
        cfg = llmopt.get_config(preset)
        prompt = list(range(1, 33))
        rows = []
        results["quantized_decode"] = {"rows": rows}      # saved row by row: a cut run keeps them
        # int8 with fused projections first (the fastest bf16 path's layout; a run cut by its limit
        # keeps the rows that decide the goal): Inductor's kernels, then llmopt's Triton GEMV (a GPU
        # only: Triton's CPU interpreter is far too slow for a smoke run), then with the bf16 rows'
        # Triton decode attention, then folded; unfused int8 as measured on 2026-11-27 in smoke mode only
        # now (on the H100 of 2026-11-28: 669.8 tokens/s, below the fused rows); int4 only in smoke mode
        # or with --int4 (1.79 ms a token on the H100, 2026-11-27)
        # (label, method, options, fuse projections, Triton decode attention)
        variants = [("int8 weight-only, fused projections", "int8", {}, True, False)]
        if device == "cuda":
            gemv = "int8 weight-only, fused projections, Triton GEMV"
            variants += [(gemv, "int8", {"kernel": "triton"}, True, False),
                         (f"{gemv}, Triton decode attention", "int8", {"kernel": "triton"}, True, True),
                         # each layer's norms, SwiGLU and residual adds inside its GEMVs (llmopt.fold)
                         (f"{gemv}, folded layers, Triton decode attention", "int8",
                          {"kernel": "triton-folded"}, True, True)]
        else:
            variants.append(("int8 weight-only", "int8", {}, False, False))
        if args.smoke or args.int4:
            variants.append(("int4 g64 weight-only", "int4", {"group_size": 64}, False, False))
        for label, method, kw, fuse, attention in variants:
            model = llmopt.build_model(cfg, device=device, dtype=dtype)
            full = model_bytes(model)
            try:
                quantize(llmopt.fuse_projections(model) if fuse else model, method, **kw)
                if attention:
                    model.set_attention("triton")
            except Exception as e:      # e.g. no Triton on this machine: the row says so
                rows.append({"label": label, "error": f"{type(e).__name__}: {e}"})
                continue
            # fused int8 on the bf16 rows' fastest path, k steps per CUDA graph (DecodeGraph); unfused int8
            # (smoke mode) as on 2026-11-27, each compiled mode reading tokens every k steps. Eager only in
            # smoke mode (on a GPU measured on 2026-11-26/27, 13-18 ms a token)
            # (folded: with dependent launches and without, as the bf16 rows)
            if fuse or method == "int4":
                folded = kw.get("kernel") == "triton-folded"
                paths = [(name.replace("llmopt", label + suffix, 1), o, dependent)
                         for suffix, dependent in (launches("") if folded else [("", None)])
                         for name, o in graph_variants(modes, args.graph_steps)]
            else:
                paths = [(f"{label} compiled ({m}), sync every {args.sync_every} tokens",
                          {"compile": m, "sync_every": args.sync_every}, None) for m in modes] or [(label, {}, None)]
            for name, opts, dependent in paths:
                with launched(dependent):
                    row = timed_row(model, name, opts, prompt)
                if "error" not in row:
                    row["bytes_ratio"] = model_bytes(model) / full
                    add_mbu([row], cfg, dtype, row["bytes_ratio"])
                rows.append(row)
                save()
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        return {"rows": rows}

    def attention_prefill():
        from llmopt.profiling import measure, peak_memory
        cfg = llmopt.get_config(preset)
        model = llmopt.build_model(cfg, device=device, dtype=dtype)
        rows = []
        for n in ((128, 256) if args.smoke else (2048, 8192)):
            ids = torch.randint(0, cfg.vocab_size, (1, n), device=device)
            for backend in ("plain", "sdpa"):
                model.set_attention(backend)
                try:
                    with torch.inference_mode():
                        forward = lambda m=model, x=ids: m(x, last_only=True)  # noqa: E731
                        t = measure(forward, warmup=1, repeats=repeats, device=device)
                        mem = peak_memory(forward, device=device)
                    rows.append({"backend": backend, "prompt_len": n, "ttft_s": t["median"],
                                 "peak_gb": mem["peak_bytes"] / 1e9})
                except torch.OutOfMemoryError:
                    rows.append({"backend": backend, "prompt_len": n, "ttft_s": None, "peak_gb": "OOM"})
                    torch.cuda.empty_cache()
        model.set_attention("sdpa")
        del model
        return {"rows": rows}

    def batching():
        """Continuous vs static batching: the trained tiny model on GPU too (tokens are real text),
        64 requests, outputs 8-256 tokens, 8 slots (smoke: 8 requests, 8-24 tokens). The rows with
        the engine's host work overlapped and with every row's blocks gathered every step changed
        nothing measurable here in two H100 runs of 2026-11-27 and are no longer run (they kept the
        suite over its 5 minutes); dialogue turns keep the overlapped row."""
        from llmopt.workload import compare_batching, ideal_continuous_speedup, poisson_workload
        model, tok = llmopt.load_model("tiny", device=device)
        n, out_len = (8, (8, 24)) if args.smoke else (64, (8, 256))
        work = poisson_workload(tok, n, seed=0, prompt_tokens=(16, 64), output_tokens=out_len)
        rows = compare_batching(model, tok, work, slots=8, repeats=repeats)
        return {"rows": rows, "slots": 8, "ideal": ideal_continuous_speedup([w.max_new_tokens for w in work], 8)}

    def batching_dialogue():
        """The same on dialogue turns, the shape of chat traffic: output lengths are the plays' speeches
        (long-tailed: median 18 tokens, the longest 392), 256 requests, 16 slots (smoke: 16
        requests, 4 slots). Also with CUDA graphs, static (`generate_batch(cuda_graphs=True)`) and
        continuous (`Engine(cuda_graphs=True, overlap=True)`): tiny's step was host-bound on the H100 (about 3 ms a
        forward, most of it launching kernels)."""
        from llmopt.workload import compare_batching, ideal_continuous_speedup, poisson_workload
        model, tok = llmopt.load_model("tiny", device=device)
        n, slots, out_len = (16, 4, (4, 32)) if args.smoke else (256, 16, (4, 512))
        work = poisson_workload(tok, n, seed=0, prompt_tokens=(16, 64), output_tokens=out_len, lengths="corpus")
        rows = compare_batching(model, tok, work, slots=slots, repeats=repeats, overlap=True, cuda_graphs=True)
        return {"rows": rows, "slots": slots,
                "ideal": ideal_continuous_speedup([w.max_new_tokens for w in work], slots)}

    def prefill_stall():
        """A long prompt (1,800 tokens; smoke: 200) arriving while 8 requests decode (smoke: 2), tiny: the
        running requests' longest gap between tokens and the long prompt's TTFT, without chunked prefill,
        with 128-token chunks (smoke: 32), and with chunks in CUDA graphs (the chunked steps fit the graphs'
        buckets; a whole long prompt does not). Never measured on a GPU before this suite ran it."""
        from llmopt.workload import prefill_stall as stall
        model, tok = llmopt.load_model("tiny", device=device)
        running, long_tokens, chunk, new = (2, 200, 32, 16) if args.smoke else (8, 1800, 128, 160)
        rows = []
        for label, opts in (("one step per prompt", {}), (f"chunked prefill, {chunk} tokens a step",
                                                         dict(chunked_prefill=True)),
                            (f"chunked prefill, {chunk} tokens a step, CUDA graphs",
                             dict(chunked_prefill=True, cuda_graphs=True, overlap=True))):
            r = stall(model, tok, running=running, long_prompt_tokens=long_tokens, max_new_tokens=new,
                      max_prefill_tokens=chunk, label=label, **opts)
            rows.append({k: v for k, v in r.items() if k not in ("token_ids", "prompts")})
        return {"rows": rows, "running": running, "long_prompt_tokens": long_tokens}

    def speculative():
        """tiny target + tiny-draft and model-free drafts, k=4, greedy (trained weights: real acceptance)."""
        from llmopt.bench import bench_speculative
        res = bench_speculative(args.smoke, device)
        keep = ("label", "e2e_tokens_per_s", "tpot_s", "acceptance_rate", "tokens_per_target_forward",
                "draft_cost_ratio", "speedup", "identical")
        return {"title": res["title"], "ratios": res["ratios"],
                "rows": [{k: r.get(k) for k in keep} for r in res["rows"]]}

    def speculative_engine():
        """Speculation inside the engine at batch 1, 4, 16 (smoke: 1, 4): tiny + tiny-draft, tiny-draft-llama and
        prompt lookup, k=4, greedy; eager steps, then both engines' steps as CUDA graphs (on a CPU the padded
        steps run eagerly)."""
        from llmopt.bench import bench_speculative_engine
        keep = ("label", "batch_size", "plain_tokens_per_s", "speculative_tokens_per_s", "speedup",
                "acceptance_rate", "speculative_forwards_per_token", "identical")
        out = results["speculative_engine"] = {"rows": []}       # saved after the eager rows: a cut run keeps them
        for graphs in (False, True):
            res = bench_speculative_engine(args.smoke, device, cuda_graphs=graphs)
            out["title"] = res["title"]
            out["rows"] += [{k: r.get(k) for k in keep} for r in res["rows"]]
            save()
        return out

    def bitsandbytes_decode():
        """bitsandbytes LLM.int8 and NF4 through transformers, on the same random-weight shape saved as a
        checkpoint (smoke: the tiny checkpoint on CPU). Skipped where bitsandbytes is not installed."""
        import importlib.util
        import tempfile
        from llmopt.profiling import hf_generate, measure_generation
        from llmopt.quantize import quantize_bnb
        if importlib.util.find_spec("bitsandbytes") is None:
            return {"skipped": "bitsandbytes is not installed here (pip install bitsandbytes)"}
        rows = []
        with tempfile.TemporaryDirectory() as folder:
            if args.smoke:
                path = "tiny"
            else:
                llmopt.save_model(llmopt.build_model(llmopt.get_config(preset), dtype=dtype), folder)
                path = folder
            prompt = torch.tensor([list(range(1, 33))], device=device)
            bnb_tokens = max(8, new_tokens // 2)       # LLM.int8 runs ~38 ms a token: half as many keeps the suite short
            for mode in ("int8", "nf4"):
                hf = quantize_bnb(path, mode, device=device, compute_dtype=dtype)
                row = measure_generation(lambda m=hf: hf_generate(m, prompt, max_new_tokens=bnb_tokens),
                                         repeats=repeats, label=f"transformers + bitsandbytes {mode}",
                                         model=f"{preset} (random weights)")
                rows.append(row)
                del hf
        return {"rows": rows}

    # The sections with goals first, and the JSON is rewritten after every section (the quantized one
    # after every row): a run stopped at its time limit still returns what it measured. The two goals
    # still missed on 2026-11-28 (MBU, int8 / bf16) come first; dialogue batching, met then (3.73x), next.
    for name, fn in (("decode_batch1", decode_vs_transformers), ("quantized_decode", quantized_decode),
                     ("batching_dialogue", batching_dialogue), ("batching", batching),
                     ("prefill_stall", prefill_stall), ("speculative", speculative),
                     ("speculative_engine", speculative_engine), ("attention_prefill", attention_prefill),
                     ("bitsandbytes", bitsandbytes_decode)):
        if args.only and name not in args.only.split(","):
            continue
        section(results, name, fn)
        save()
    save()      # also when --only named no section: the probes and an empty goals table
    print((out / "gpu_results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
