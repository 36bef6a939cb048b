"""Parallel generation across processes and GPUs with torch.distributed (notebook 10).

Two ways to use several devices:
- **Data parallel**: every rank holds the whole model and generates its share of
  the prompts; results are gathered back in the original order. No
  communication while generating; throughput scales with ranks, latency does not.
- **Tensor parallel** (Megatron-LM style): every rank holds a slice of every
  layer. q/k/v and the MLP's gate/up projections are split by output (column
  parallel: each rank owns whole attention heads and MLP channels); o_proj and
  down_proj are split by input (row parallel), so each rank computes a partial
  sum and one all-reduce per block adds them up. Two all-reduces per layer per
  step: the model's memory and FLOPs per rank shrink, communication is added.

Launch with torchrun; the same code runs on one machine or several:

    torchrun --nproc_per_node 2 -m llmopt.parallel tensor --model tiny --max-new-tokens 32
    torchrun --nproc_per_node 2 -m llmopt.parallel data --model tiny --prompts "ROMEO:" "KING:"
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m llmopt.parallel ...

gloo on CPU (the tests run 2 processes here), NCCL on GPUs (one GPU per rank).
`launch(...)` starts such a run as a subprocess and returns rank 0's JSON result.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn


# ---- tensor parallel --------------------------------------------------------------------------
class CommTimer:
    """Wall time spent in collective communication (gloo is synchronous; on GPUs we synchronize)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return x


class RowParallelLinear(nn.Module):
    """A linear layer split by its input features: local partial product, then all-reduce (sum)."""

    def __init__(self, local: nn.Linear, timer: CommTimer) -> None:
        super().__init__()
        self.local, self.timer = local, timer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.timer.all_reduce(self.local(x))


def _rows(w: torch.Tensor, rank: int, world: int, unit: int) -> torch.Tensor:
    """This rank's slice of the output rows of a weight [out, in] (or bias [out]), in blocks of `unit`."""
    n = w.shape[0] // world
    assert n % unit == 0
    return w[rank * n:(rank + 1) * n]


def shard_model(model, rank: int, world: int, timer: CommTimer | None = None):
    """This rank's tensor-parallel shard of an llmopt `Transformer` (weights copied, a new model).

    Heads and kv heads, and MLP channels, are divided evenly between ranks; the
    embedding, norms and lm_head stay replicated. The shard is an ordinary
    Transformer whose config has the local head and channel counts, so
    `generate`, the caches and the profilers work on it unchanged.
    """
    from .model import Transformer
    cfg = model.config
    for name, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs {name} ({n}) divisible by "
                             f"{world}: use a world size that divides it")
    hd = cfg.head_dim
    local_cfg = replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=cfg.n_kv_heads // world,
                        intermediate_size=cfg.intermediate_size // world, head_dim=hd)
    timer = timer or CommTimer()
    with torch.device(model.device):
        shard = Transformer(local_cfg).to(model.dtype)
    src = model.state_dict()
    state = {}
    for key, value in src.items():
        if ".q_proj." in key or ".k_proj." in key or ".v_proj." in key:
            state[key] = _rows(value, rank, world, hd)                   # column parallel, whole heads
        elif ".gate_proj." in key or ".up_proj." in key:
            state[key] = _rows(value, rank, world, 1)
        elif ".o_proj." in key or ".down_proj." in key:
            n = value.shape[1] // world                                   # row parallel: split inputs
            state[key] = value[:, rank * n:(rank + 1) * n]
        else:
            state[key] = value                                            # replicated
    shard.load_state_dict(state)
    for layer in shard.layers:
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, timer)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, timer)
    shard.comm = timer
    shard.name = f"{getattr(model, 'name', 'model')} (tensor parallel {rank}/{world})"
    return shard.eval()


# ---- the torchrun entry point -----------------------------------------------------------------
def _setup() -> tuple[int, int, torch.device]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def run_data_parallel(args, rank: int, world: int, device) -> dict | None:
    """Every rank generates prompts rank, rank+world, ...; rank 0 gathers them back in order."""
    from .generate import generate
    from .load import load_model
    model, tok = load_model(args.model, device=device)
    mine = list(range(rank, len(args.prompts), world))
    dist.barrier()
    t0 = time.perf_counter()
    out = {i: generate(model, tok, args.prompts[i], max_new_tokens=args.max_new_tokens,
                       ignore_eos=True).token_ids for i in mine}
    seconds = time.perf_counter() - t0
    gathered = [None] * world if rank == 0 else None
    dist.gather_object({"outputs": out, "seconds": seconds, "device": str(device)}, gathered, dst=0)
    if rank != 0:
        return None
    outputs: dict[int, list[int]] = {}
    for part in gathered:
        outputs.update(part["outputs"])
    tokens = sum(len(v) for v in outputs.values())
    wall = max(p["seconds"] for p in gathered)
    return {"mode": "data", "world_size": world, "prompts": len(args.prompts),
            "outputs": [outputs[i] for i in range(len(args.prompts))],
            "rank_seconds": [p["seconds"] for p in gathered], "wall_s": wall,
            "tokens_per_s": tokens / wall, "devices": [p["device"] for p in gathered]}


def run_tensor_parallel(args, rank: int, world: int, device) -> dict | None:
    """Generate with a tensor-parallel shard on every rank; compare with the whole model on rank 0."""
    from .generate import generate
    from .load import load_model
    model, tok = load_model(args.model, device=device)
    shard = shard_model(model, rank, world)
    prompt = args.prompts[0]
    ids = tok.encode(prompt)
    with torch.inference_mode():
        logits = shard(torch.tensor([ids], device=device))              # prompt logits, all positions
    generate(shard, tok, prompt, max_new_tokens=4, ignore_eos=True)     # warm-up
    dist.barrier()
    shard.comm.seconds, shard.comm.calls = 0.0, 0
    g = generate(shard, tok, prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    comm_per_token = shard.comm.seconds / len(g.token_ids)
    result = {"rank": rank, "comm_s_per_token": comm_per_token, "tpot_s": g.stats["tpot_s"],
              "e2e_s": g.stats["e2e_s"], "all_reduces_per_token": shard.comm.calls / len(g.token_ids)}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(result, gathered, dst=0)
    if rank != 0:
        return None
    with torch.inference_mode():
        full_logits = model(torch.tensor([ids], device=device))
        single = generate(model, tok, prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True)
        single = generate(model, tok, prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    per_token = g.stats["e2e_s"] / len(g.token_ids)
    comm = sum(r["comm_s_per_token"] for r in gathered) / world
    return {"mode": "tensor", "world_size": world, "prompt": prompt, "tokens": g.token_ids,
            "single_process_tokens": single.token_ids, "tokens_equal": g.token_ids == single.token_ids,
            "max_abs_logit_diff": float((logits - full_logits).abs().max()),
            "tpot_s": g.stats["tpot_s"], "single_tpot_s": single.stats["tpot_s"],
            "s_per_token": per_token, "comm_s_per_token": comm, "comm_share": comm / per_token,
            "all_reduces_per_token": gathered[0]["all_reduces_per_token"],
            "device": str(device), "ranks": gathered}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmopt.parallel", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["data", "tensor"])
    p.add_argument("--model", default="tiny")
    p.add_argument("--prompts", nargs="+", default=["ROMEO:", "KING:\nNow", "JULIET:", "HAMLET:"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--out", default=None, help="rank 0 writes its JSON result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world, device = _setup()
    try:
        run = run_data_parallel if args.mode == "data" else run_tensor_parallel
        result = run(args, rank, world, device)
        if result is not None:
            text = json.dumps(result, indent=1)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
            else:
                print(text)
    finally:
        dist.destroy_process_group()
    return 0


def launch(mode: str, nproc: int = 2, *, model: str = "tiny", prompts: list[str] | None = None,
           max_new_tokens: int = 32, threads: int = 1, timeout: float = 600) -> dict:
    """Run `torchrun --nproc_per_node nproc -m llmopt.parallel mode ...` as a subprocess (notebook 10)
    and return rank 0's result. Raises RuntimeError with the ranks' output if it fails."""
    if mode not in ("data", "tensor"):
        raise ValueError(f"mode must be 'data' or 'tensor', got {mode!r}")
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "llmopt.parallel", mode, "--model", str(model), "--max-new-tokens", str(max_new_tokens),
               "--threads", str(threads), "--out", out]
        if prompts:
            cmd += ["--prompts", *prompts]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"torchrun failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
