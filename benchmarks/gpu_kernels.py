"""Which kernels eat a decode step? torch.profiler over a few compiled decode steps per variant.

    python benchmarks/gpu_kernels.py --variants bf16,bf16-fused,int8,int4   # on a GPU
    python benchmarks/gpu_kernels.py --smoke                              # CPU, tiny shape

Prints, per variant, the step time and the top kernels by device time (random weights: shapes decide speed).
"""
from __future__ import annotations

import argparse
import sys
import time
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
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--variants", default="bf16,int8,int8-ref,int4")
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    preset = "tiny" if args.smoke else args.preset
    cfg = llmopt.get_config(preset)
    prompt = list(range(1, 33))
    for name in args.variants.split(","):
        model = llmopt.build_model(cfg, device=device, dtype=dtype)
        VARIANTS[name](model)
        compile_mode = False if args.smoke else args.mode
        llmopt.generate(model, None, prompt, max_new_tokens=16, ignore_eos=True, compile=compile_mode)
        g = llmopt.generate(model, None, prompt, max_new_tokens=64, ignore_eos=True, compile=compile_mode)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            llmopt.generate(model, None, prompt, max_new_tokens=8, ignore_eos=True, compile=compile_mode)
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"\n== {name}: TPOT {g.stats['tpot_s'] * 1e3:.2f} ms ({device}, {preset}, compile={compile_mode}); "
              f"top kernels over 8 tokens:", flush=True)
        print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=70))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"done in {time.perf_counter() - t0:.0f} s")
    sys.exit(rc)
