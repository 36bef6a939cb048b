"""Train the embedded models on the Shakespeare corpus (notebooks 00 and 05).

    python -m llmopt.train --preset tiny --out data/tiny --steps 1200
    python -m llmopt.train --preset tiny-draft-llama --out data/tiny-draft-llama --tokenizer data/tiny --steps 1800

Seeded and recorded: the run's settings, loss curve and held-out perplexity land
in `training_report.json` and `TRAINING.md` beside the weights. The tokenizer is
trained first (or reused with --tokenizer) so both models share it.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import get_config
from .data import TEST_WORKS, VALIDATION_WORKS, load_split
from .metrics import check_vocab, logits_of
from .model import build_model
from .precision import as_dtype, check_device, check_dtype


def encode_split(tok, split: str) -> torch.Tensor:
    """All works of a split as one 1-D tensor of token ids, works separated by EOS."""
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for text in load_split(split):
        ids.extend(tok.encode(text).ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def get_batch(data, batch_size: int, seq_len: int, gen: torch.Generator):
    """Random windows: inputs [B, T] and next-token targets [B, T].

    `data` is a 1-D tensor of ids, or `data.TokenShards` (memory-mapped shards on disk).
    """
    if hasattr(data, "get_batch"):
        return data.get_batch(batch_size, seq_len, gen)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s: s + seq_len] for s in starts.tolist()])
    y = torch.stack([data[s + 1: s + seq_len + 1] for s in starts.tolist()])
    return x, y


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(model, optimizer, x, y, *, amp_dtype: torch.dtype | None = None, scaler=None) -> float:
    """One optimizer step; with `amp_dtype` the forward runs under autocast (notebook 05)."""
    device_type = x.device.type
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = logits_of(model, x)            # llmopt's model, or a transformers model's .logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16: scale the loss so small gradients do not underflow
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return loss.item()


_SPLIT_IDS: dict = {}


def split_ids(tokenizer, split: str = "train") -> torch.Tensor:
    """A split's token ids for an llmopt `Tokenizer` (memoized: encoding takes a few seconds)."""
    key = (id(tokenizer), split)
    if key not in _SPLIT_IDS:
        _SPLIT_IDS[key] = encode_split(tokenizer.backend, split)
    return _SPLIT_IDS[key]


def finetune(model, tokenizer, *, steps: int = 20, batch_size: int = 8, seq_len: int = 128,
             lr: float = 3e-4, amp_dtype: torch.dtype | None = None, seed: int = 0,
             after_step=None) -> dict:
    """A short fine-tune on the training split, fp32 or mixed precision (notebook 05).

    With `amp_dtype` the forward runs under autocast; fp16 also gets a GradScaler
    (its gradients would underflow otherwise). `after_step()` runs after every
    optimizer step (pruning uses it to keep pruned weights at zero). Returns the loss
    curve, the median step time and the tokens per second.
    """
    import statistics
    device = next(model.parameters()).device
    data = split_ids(tokenizer, "train")
    check_vocab(model, data, "finetune")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for _ in range(steps):
        x, y = get_batch(data, batch_size, seq_len, gen)
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, x, y, amp_dtype=amp_dtype, scaler=scaler))
        if after_step is not None:
            after_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    model.eval()
    step = statistics.median(times[1:] if len(times) > 1 else times)
    return {"losses": losses, "step_time_s": step, "tokens_per_s": batch_size * seq_len / step,
            "epoch_time_s": len(data) / (batch_size * seq_len) * step,
            "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32"}


@torch.no_grad()
def eval_loss(model, data: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token loss over non-overlapping windows of `data`."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    losses = []
    for i in range(n):
        x = data[i * seq_len: (i + 1) * seq_len][None]
        y = data[i * seq_len + 1: (i + 1) * seq_len + 1][None]
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def write_report_md(folder: str | Path) -> Path:
    """`TRAINING.md` beside the weights: a readable summary of `training_report.json`."""
    folder = Path(folder)
    r = json.loads((folder / "training_report.json").read_text())
    a, c = r["args"], r["config"]
    lines = [f"# {r['preset']}: training report", "",
             f"- Architecture: `{c['architectures'][0]}`, {r['n_params']:,} parameters: "
             f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads "
             f"({c['num_key_value_heads']} kv heads), SwiGLU {c['intermediate_size']}, vocabulary "
             f"{c['vocab_size']}, tied embeddings: {c['tie_word_embeddings']}.",
             f"- Data: Shakespeare corpus (`data/shakespeare`, see its SOURCE.md), {r['train_tokens']:,} "
             f"training tokens; validation works {', '.join(r['validation_works'])}; test works "
             f"{', '.join(r['test_works'])}.",
             f"- Run: `python -m llmopt.train --preset {r['preset']} --out {a['out']}"
             + (f" --tokenizer {a['tokenizer']}" if a.get("tokenizer") else "")
             + f" --steps {a['steps']}` (seed {a['seed']}, batch {a['batch_size']} x {a['seq_len']} "
             f"tokens, AdamW lr {a['lr']} with warm-up and cosine decay), {r['tokens_seen']:,} tokens "
             f"seen in {r['train_seconds'] / 60:.1f} minutes on {r['machine']}.",
             f"- Held-out perplexity (sliding window of {a['seq_len']} tokens): validation "
             f"**{r['validation_perplexity']}**, test **{r['test_perplexity']}**.", "",
             "| step | train loss | validation loss | seconds |", "|---|---|---|---|"]
    lines += [f"| {h['step']} | {h['train_loss']} | {h['val_loss']} | {h['seconds']} |" for h in r["history"]]
    path = folder / "TRAINING.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmopt.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--tokenizer", help="reuse this folder's tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed-precision training (autocast; "
                   "fp16 adds a GradScaler); the saved weights stay fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-tokens", type=int, help="score only this many held-out tokens (quick runs)")
    p.add_argument("--shards", help="train on the token shards in this folder (llmopt.data.tokenize_dask); "
                   "needs --tokenizer, the tokenizer the shards were made with")
    args = p.parse_args(argv)
    if args.shards and not args.tokenizer:
        p.error("--shards needs --tokenizer (the folder whose tokenizer.json made the shards)")
    for name in ("steps", "batch_size", "seq_len", "vocab_size", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:   # checked before the tokenizer and corpus work, and kept for the run
        preset = get_config(args.preset)
        device = check_device(args.device)
        amp_dtype = check_dtype(device, as_dtype(args.amp)) if args.amp else None
    except ValueError as e:
        p.error(str(e))
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        p.error(f"--tokenizer {args.tokenizer}: no tokenizer.json in that folder")

    from tokenizers import Tokenizer as HFTokenizer
    from .load import save_model
    from .metrics import perplexity
    from .tokenizer import Tokenizer, train_tokenizer

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.tokenizer:
        tok = HFTokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    else:
        tok = train_tokenizer(load_split("train"), vocab_size=args.vocab_size)
    eos = tok.token_to_id("<|endoftext|>")
    train_ids, val_ids = encode_split(tok, "train"), encode_split(tok, "validation")
    if args.shards:   # train on pre-tokenized shards (notebook 12's Dask pipeline) instead
        from .data import TokenShards
        train_ids = TokenShards(args.shards)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train {len(train_ids):,} tokens, "
          f"validation {len(val_ids):,} ({time.perf_counter() - t0:.1f}s)")

    cfg = preset.replace(vocab_size=tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    model = build_model(cfg, seed=args.seed, device=device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    t_train = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"train {args.preset}", mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = get_batch(train_ids, args.batch_size, args.seq_len, gen)
        loss = train_step(model, opt, x.to(device), y.to(device), amp_dtype=amp_dtype, scaler=scaler)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = eval_loss(model, val_ids.to(device), args.seq_len)
            history.append({"step": step + 1, "train_loss": round(loss, 4), "val_loss": round(val, 4),
                            "seconds": round(time.perf_counter() - t_train, 1)})
            bar.write(json.dumps(history[-1]))
    train_seconds = time.perf_counter() - t_train

    model = model.eval().cpu()
    out = Path(args.out)
    save_model(model, out, tokenizer=tok)
    wrapped = Tokenizer.from_folder(out)
    test_ppl = perplexity(model, wrapped, split="test", context=args.seq_len, max_tokens=args.eval_tokens)
    val_ppl = perplexity(model, wrapped, split="validation", context=args.seq_len,
                         max_tokens=args.eval_tokens)
    report = {
        "preset": args.preset, "config": cfg.to_hf(), "n_params": cfg.n_params,
        "args": vars(args), "train_tokens": len(train_ids), "validation_works": VALIDATION_WORKS,
        "test_works": TEST_WORKS, "history": history, "train_seconds": round(train_seconds, 1),
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "validation_perplexity": round(val_ppl, 2), "test_perplexity": round(test_ppl, 2),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}".strip(),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report_md(out)
    print(json.dumps({k: report[k] for k in ("n_params", "train_seconds", "validation_perplexity",
                                              "test_perplexity")}))


if __name__ == "__main__":
    main()
