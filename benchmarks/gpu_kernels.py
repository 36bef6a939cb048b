"""Which kernels eat a decode step? torch.profiler over a few compiled decode steps per variant.

    python benchmarks/gpu_kernels.py --variants bf16,bf16-fused,int8,int4   # on a GPU
    python benchmarks/gpu_kernels.py --smoke                              # CPU, tiny shape
    python benchmarks/gpu_kernels.py --gemv --variants ""                 # only the Triton GEMV's blocks
    python benchmarks/gpu_kernels.py --variants bf16-fused,int8-fused-triton --graph-steps 16  # the goal's rows
    python benchmarks/gpu_kernels.py --variants int8-folded-attn,bf16-folded-attn --graph-steps 16
    python benchmarks/gpu_kernels.py --variants bf16-folded-attn,bf16-folded-attn-plain --graph-steps 16  # PDL
    python benchmarks/gpu_kernels.py --attention --variants ""            # only decode attention's timings
    python benchmarks/gpu_kernels.py --chain --variants ""                # folded layers' kernels, PDL on / off

Prints, per variant, the step time and the top kernels by device time (random weights: shapes decide speed).
With --gemv it first times llmopt's Triton GEMV (`llmopt.kernels.gemv`) on each distinct weight shape of the
model, int8 and bf16, with the block sizes `gemv_config` picks and with the neighbouring ones, as GB/s of weight read.
With --attention it times one decode step's attention of one layer, SDPA (what the model runs by default)
against llmopt's Triton decode attention with the splits it picks and with others, for caches of several
lengths, full or mostly unwritten, and the step from the projections on (rotary, the cache write, attention),
compiled around the kernel against all three in it (`decode_attention_append`). Each timing: 20 launches
recorded as one CUDA graph, so the host's launch cost is not in it. With --chain it times the folded layers'
own kernels in a row (one CUDA graph of 4 steps), bf16 and int8 weights, as dependent launches and plainly.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import llmopt  # noqa: E402
from llmopt.quantize import quantize  # noqa: E402

VARIANTS = {   # what each variant does to the model (in place)
    "bf16": lambda m: m,
    "bf16-fused": llmopt.fuse_projections,            # q, k, v and gate, up as one matmul each
    "int8": lambda m: quantize(m, "int8"),
    "int8-ref": lambda m: quantize(m, "int8", fused=False),
    # llmopt's Triton GEMV behind every int8 layer (CUDA; a CPU smoke run takes Inductor's int8 instead)
    "int8-fused-triton": lambda m: quantize(llmopt.fuse_projections(m), "int8",
                                            kernel="triton" if m.device.type == "cuda" else "auto"),
    "int4": lambda m: quantize(m, "int4", group_size=64),
    # the same two with llmopt's Triton decode attention in every layer (CUDA; SDPA on a CPU)
    "bf16-fused-attn": lambda m: triton_attention(llmopt.fuse_projections(m)),
    "int8-fused-triton-attn": lambda m: triton_attention(VARIANTS["int8-fused-triton"](m)),
    # and each layer's norms, SwiGLU and residual adds folded into its GEMVs (llmopt.fold; CUDA), int8 and bf16
    "int8-folded-attn": lambda m: triton_attention(quantize(
        llmopt.fuse_projections(m), "int8", kernel="triton-folded" if m.device.type == "cuda" else "auto")),
    "bf16-folded-attn": lambda m: triton_attention(llmopt.fold_layers(llmopt.fuse_projections(m))
                                                   if m.device.type == "cuda" else llmopt.fuse_projections(m)),
    # bf16-fused-attn compiled with Inductor's combo kernels (INDUCTOR_OPTIONS)
    "bf16-fused-attn-combo": lambda m: VARIANTS["bf16-fused-attn"](m),
    # bf16-folded-attn with llmopt's kernels launched plainly, not as dependent launches (Hopper; PLAIN_LAUNCHES)
    "bf16-folded-attn-plain": lambda m: VARIANTS["bf16-folded-attn"](m),
}
PLAIN_LAUNCHES = {"bf16-folded-attn-plain"}
# Inductor's horizontal fusion ("combo kernels", torch >= 2.9): kernels with no data between them, of
# different sizes, generated as one launch where timing each candidate says it pays. It was aimed at the
# rotary and cache-write siblings of each layer, which `kernels.decode_attention_append` now takes into the
# attention kernel, so the suite no longer times it; this variant still can
COMBO_KERNELS = {"combo_kernels": True, "benchmark_combo_kernel": True}
# Inductor options a variant compiles with
INDUCTOR_OPTIONS = {"bf16-fused-attn-combo": COMBO_KERNELS}


def triton_attention(model):
    return model.set_attention("triton") if model.device.type == "cuda" else model


def gemv_neighbours(cfg: dict, k: int) -> list[dict]:
    """`cfg` and the configs one step away from it: half or twice the outputs or the K block, other warps."""
    bn, bk, nw = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    out = [cfg]
    out += [dict(cfg, BLOCK_N=b) for b in (bn // 2, bn * 2) if 1 <= b <= 32]
    out += [dict(cfg, BLOCK_K=b) for b in (bk // 2, bk * 2) if 64 <= b <= max(64, 2 * k)]
    out += [dict(cfg, num_warps=w) for w in (2, 4, 8) if w != nw]
    return out


def time_gemv(x, q, scale, config: dict, device: str) -> float:
    """Seconds per call of the GEMV with `config` (`time_launches`)."""
    from llmopt.kernels import gemv_with
    return time_launches(lambda: gemv_with(x, q, scale, config), device)


def time_launches(call, device: str, launches: int = 20) -> float:
    """Seconds per `call()`: on CUDA the median of 5 replays of a graph of `launches` calls, timed
    with events; elsewhere (Triton's interpreter) one call."""
    call()                                              # compiles
    if device != "cuda":
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            call()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return sorted(times)[2]


def gemv_sweep(cfg, device: str, dtype, smoke: bool) -> None:
    """The Triton GEMV on the model's weight shapes (fused q/k/v and gate/up, as the suite runs them), on
    int8 weights and on weights in the activations' dtype (what a folded bf16 layer runs)."""
    from llmopt.kernels import gemv_config
    from llmopt.quantize import quantize_int8
    hd = cfg.head_dim
    shapes = {"q,k,v fused": ((cfg.n_heads + 2 * cfg.n_kv_heads) * hd, cfg.dim), "o": (cfg.dim, cfg.n_heads * hd),
              "gate,up fused": (2 * cfg.intermediate_size, cfg.dim), "down": (cfg.dim, cfg.intermediate_size),
              "lm_head": (cfg.vocab_size, cfg.dim)}
    if smoke:     # Triton's interpreter: one small shape, two configs
        shapes = {"o": shapes["o"]}
    for weights in ("int8", str(dtype).removeprefix("torch.")):
        print(f"\n== Triton GEMV ({device}, {weights} weights): GB/s of weight read per call; * = gemv_config's pick",
              flush=True)
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device=device, dtype=dtype)
            q, scale = quantize_int8(w) if weights == "int8" else (w, None)
            scale, x = None if scale is None else scale.to(dtype), torch.randn(k, device=device, dtype=dtype)
            pick, nbytes = gemv_config(n, k, q.element_size()), q.numel() * q.element_size()
            configs = gemv_neighbours(pick, k)[:2] if smoke else gemv_neighbours(pick, k)
            cells = []
            for c in configs:
                t = time_gemv(x, q, scale, c, device)
                cells.append(f"{'*' if c == pick else ''}{c['BLOCK_N']}x{c['BLOCK_K']}/w{c['num_warps']} "
                             f"{nbytes / t / 1e9:.0f}")
            print(f"{name} [{n} x {k}], {nbytes / 2**20:.1f} MiB: " + "; ".join(cells), flush=True)
            del w, q


def attention_sweep(cfg, device: str, dtype, smoke: bool) -> None:
    """One layer's decode attention (batch 1), SDPA against llmopt's Triton kernel, on static caches of
    several lengths: every slot written, and 288 of them written (the suite's decode: 32 + 256 tokens);
    then the step from the projections on (rotary, cache write, attention), compiled around the kernel
    against `decode_attention_append`."""
    import torch.nn.functional as F
    from llmopt.kernels import decode_attention_append, decode_attention_config, decode_attention_with
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 8
    print(f"\n== decode attention ({device}, {H} query heads, {Hkv} kv heads, head dim {D}): us per call; "
          f"Triton with the splits its config picks (*) and others", flush=True)
    separate = torch.compile(rotary_cache_write_attention, fullgraph=True)
    for S in ((96,) if smoke else (288, 1024, 4096)):
        for written in sorted({S, min(S, 288)}, reverse=True):
            q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
            k, v = (torch.randn(1, Hkv, S, D, device=device, dtype=dtype) for _ in range(2))
            # the additive [1, S] mask a plain static cache's decode step makes (Transformer.layer_inputs)
            mask = torch.zeros(1, S, device=device, dtype=dtype)
            mask[:, written:] = float("-inf")
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
            cells = [f"SDPA {time_launches(sdpa, device) * 1e6:.1f}"]
            pick = decode_attention_config(1, Hkv, H // Hkv, S, D, processors)
            for p in ((processors,) if smoke else (1, processors // 2, processors, 2 * processors)):
                c = decode_attention_config(1, Hkv, H // Hkv, S, D, p)
                t = time_launches(lambda: decode_attention_with(q, k, v, mask, c), device)
                cells.append(f"{'*' if c == pick else ''}{c['SPLITS']} splits {t * 1e6:.1f}")
            if written == min(S, 288):
                # a static cache's decode step from the projections on: rotary, cache write and attention as
                # the compiled step ran them before (Inductor's kernels around the op), and in one kernel
                qp, kp, vp = (torch.randn(1, 1, n * D, device=device, dtype=dtype) for n in (H, Hkv, Hkv))
                angle = torch.rand(1, 1, 1, D, device=device) * 100
                cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
                pos = torch.tensor([written - 1], device=device)
                t_sep = time_launches(lambda: separate(qp, kp, vp, cos, sin, k, v, pos), device)
                t_one = time_launches(lambda: decode_attention_append(qp, kp, vp, cos, sin, k, v, pos), device)
                cells.append(f"with rotary and the cache write: compiled around the kernel {t_sep * 1e6:.1f}, "
                             f"in it (append) {t_one * 1e6:.1f}")
            print(f"{S} keys, {written} written: " + "; ".join(cells), flush=True)


def layer_chain(cfg, device: str, dtype, smoke: bool) -> None:
    """Folded layers' one-token steps as llmopt's kernels run them, every layer of the model in a row with
    its own weights and cache (the GEMV on q, k, v with the norm; the attention with rotary and the cache
    write; o with the residual; gate, up with the norm; down with SwiGLU and the residual), recorded as one
    CUDA graph: weights in the activations' dtype and int8, each launched as programmatic dependent launches
    and plainly. No embedding, output head or Inductor kernel: what the layers' own kernels cost, what
    dependent launch takes off it, and what int8 buys there."""
    from llmopt.kernels import (decode_attention_append_with, decode_attention_config, dependent_launch,
                                dependent_launches, gemv_config, gemv_with)
    from llmopt.quantize import quantize_int8
    H, Hkv, D, dim, inter = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.intermediate_size
    n_layers, S, pos = (1, 96, 47) if smoke else (cfg.n_layers, 512, 287)    # the suite's decode: 288 keys
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 8
    attention = decode_attention_config(1, Hkv, H // Hkv, S, D, processors)
    # Triton's interpreter (smoke): a few large blocks, as the tests use; a GPU: gemv_config's picks
    blocks = (lambda w: {"BLOCK_N": 128, "BLOCK_K": 256, "num_warps": 4}) if smoke else \
        (lambda w: gemv_config(*w.shape, w.element_size()))
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) / shape[-1] ** 0.5  # noqa: E731
    shapes = {"qkv": ((H + 2 * Hkv) * D, dim), "o": (dim, H * D), "gate_up": (2 * inter, dim), "down": (dim, inter)}
    full = [{name: rand(*shape) for name, shape in shapes.items()} for _ in range(n_layers)]
    norm = torch.ones(dim, device=device, dtype=dtype)
    caches = [(rand(1, Hkv, S, D), rand(1, Hkv, S, D)) for _ in range(n_layers)]
    angle = torch.rand(1, 1, 1, D, device=device) * 100
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    slot, x0 = torch.tensor([pos], device=device), rand(dim)

    def step(layers):      # layers: per layer, name -> (weight, its int8 scale or None)
        x = x0
        for w, (k_cache, v_cache) in zip(layers, caches):
            gemv = lambda a, name, **kw: gemv_with(a, *w[name], blocks(w[name][0]), **kw)  # noqa: E731
            q, k, v = gemv(x, "qkv", norm=norm, eps=1e-5).split([H * D, Hkv * D, Hkv * D])
            a = decode_attention_append_with(q.view(1, 1, -1), k.view(1, 1, -1), v.view(1, 1, -1), cos, sin,
                                             k_cache, v_cache, slot, None, attention)
            h = gemv(a.view(-1), "o", residual=x)
            gate, up = gemv(h, "gate_up", norm=norm, eps=1e-5).chunk(2)
            x = gemv(gate, "down", up=up, residual=h)
        return x

    kernels = n_layers * (5 + (attention["SPLITS"] > 1))
    print(f"\n== {n_layers} folded layers' kernels in a row ({device}, {kernels} kernels, {pos + 1} keys): us per "
          f"step, the weights' GB/s", flush=True)
    for kind in (str(dtype).removeprefix("torch."), "int8"):
        layers = [{name: (t, None) for name, t in w.items()} for w in full] if kind != "int8" else \
            [{name: (q, s.to(dtype)) for name, (q, s) in ((n, quantize_int8(t)) for n, t in w.items())} for w in full]
        nbytes = sum(t.numel() * t.element_size() for w in layers for t, _ in w.values())
        cells, outputs = [f"{kind} weights ({nbytes / 2**20:.0f} MiB)"], []
        for dependent in (True, False):
            with dependent_launches(dependent):
                if dependent and not dependent_launch(device):
                    cells.append("dependent launches: not on this device")
                    continue
                t = time_launches(lambda: step(layers), device, launches=4)
                outputs.append(step(layers))
            cells.append(f"{'dependent' if dependent else 'plain'} launches {t * 1e6:.1f} us, "
                         f"{nbytes / t / 1e9:.0f} GB/s")
        if len(outputs) == 2:     # the same kernels, the same order of sums: the same bits
            cells.append(f"same output: {torch.equal(*outputs)}")
        print("; ".join(cells), flush=True)
        del layers


def rotary_cache_write_attention(q, k, v, cos, sin, k_cache, v_cache, pos):
    """What `Attention.attend` ran for a static cache's decode step before `decode_attention_append`:
    rotary, the cache's index_copy_ and the Triton decode attention (q [1, 1, H*D], k, v [1, 1, Hkv*D])."""
    from llmopt.kernels import decode_attention
    from llmopt.model import rotate_half
    D = k_cache.shape[-1]
    q, k, v = (t.view(1, 1, -1, D).transpose(1, 2) for t in (q, k, v))
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    return decode_attention(q, k_cache, v_cache, None, pos)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--variants", default="bf16,int8,int8-ref,int4")
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--gemv", action="store_true", help="time the Triton int8 GEMV's block sizes first")
    p.add_argument("--attention", action="store_true", help="time decode attention, SDPA and Triton, first")
    p.add_argument("--chain", action="store_true",
                   help="time the folded layers' kernels in a row, bf16 and int8, dependent launches and plain")
    p.add_argument("--graph-steps", type=int, default=1,
                   help="decode k steps per CUDA graph (the suite's fastest rows; GPU), profiling one graph")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    preset = "tiny" if args.smoke else args.preset
    cfg = llmopt.get_config(preset)
    prompt = list(range(1, 33))
    if (args.gemv or args.attention or args.chain) and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # Triton's interpreter: on before Triton is imported
    failed = 0
    # each part on its own: one that fails (a kernel this machine's Triton cannot build) prints its error
    # and the rest still run, as in the suite
    parts = [("gemv", lambda: gemv_sweep(cfg, device, dtype, args.smoke))] if args.gemv else []
    parts += [("attention", lambda: attention_sweep(cfg, device, dtype, args.smoke))] if args.attention else []
    parts += [("chain", lambda: layer_chain(cfg, device, dtype, args.smoke))] if args.chain else []
    parts += [(name, lambda name=name: profile_variant(name, cfg, device, dtype, args, prompt))
              for name in filter(None, args.variants.split(","))]
    for name, part in parts:
        try:
            part()
        except Exception:
            failed += 1
            print(f"\n== {name} failed:\n{traceback.format_exc()[-3000:]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


def profile_variant(name: str, cfg, device: str, dtype, args, prompt) -> None:
    """The step time of variant `name` and the top kernels of a few of its steps."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    model = llmopt.build_model(cfg, device=device, dtype=dtype)
    preset = "tiny" if args.smoke else args.preset
    VARIANTS[name](model)
    compile_mode = False if args.smoke else args.mode
    k = 1 if device == "cpu" else args.graph_steps
    run = lambda n: llmopt.generate(model, None, prompt, max_new_tokens=n, ignore_eos=True,  # noqa: E731
                                    compile=compile_mode, graph_steps=k)
    import torch._inductor.config as inductor
    with llmopt.kernels.dependent_launches(False) if name in PLAIN_LAUNCHES else contextlib.nullcontext():
        with inductor.patch(INDUCTOR_OPTIONS.get(name, {})):     # compiling happens inside the first call
            run(16)
        g = run(64)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        steps = 8 if k == 1 else k + 1       # with graphs: the prefill's token and one graph of k steps
        with profile(activities=acts) as prof:
            run(steps)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n== {name}: TPOT {g.stats['tpot_s'] * 1e3:.2f} ms ({device}, {preset}, compile={compile_mode}"
          f"{f', {k} steps per CUDA graph' if k > 1 else ''}); top kernels over {steps} tokens:", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"done in {time.perf_counter() - t0:.0f} s")
    sys.exit(rc)
