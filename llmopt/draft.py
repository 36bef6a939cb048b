"""`tiny-draft`: a draft model built to be cheap per step (notebook 09).

Speculative decoding pays when a draft step costs a small fraction `c` of a target
step and still agrees with the target often. On a CPU the embedded 4-layer target
spends most of its ~2 ms step in fixed per-operation overhead (about 60 small ops
over four layers, each with a cache update), so a smaller *transformer* draft is not
much cheaper: two narrow layers still cost ~0.7 ms (c ~ 0.3-0.35), and four draft
steps cost more than the target step they save.

`MLPDraft` is a neural n-gram model (Bengio et al., 2003): the embeddings of the last
`context` tokens, concatenated, go through one hidden layer to the logits. A step is
seven small ops and no cache, about 0.16 ms here (c ~ 0.09, mostly reading two ~1 MB
matrices: the hidden layer and the head), and because it is trained
to copy the *target's* greedy choice (distillation), not the corpus's next token, it
agrees with the target about half the time on held-out text, and more on the
target's own repetitive greedy text.

It is a proposer (`propose(tokens, k)`), like prompt lookup: `speculative_generate`
verifies its proposals with the target, so greedy output stays the target's own and
sampling keeps the target's distribution (its greedy proposals are point masses).

Train it (about 12 minutes on 2 CPU cores):

    python -m llmopt.draft --target data/tiny --out data/tiny-draft
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .sampling import greedy

MODEL_TYPE = "llmopt-mlp-draft"


@dataclasses.dataclass(frozen=True)
class MLPDraftConfig:
    vocab_size: int = 4096
    context: int = 8           # tokens the draft sees
    embed_dim: int = 64
    hidden_dim: int = 512
    out_dim: int = 64
    pad_token_id: int = 0      # fills the context before the first token
    eos_token_id: int | None = 0

    @property
    def n_params(self) -> int:
        c = self
        return (c.vocab_size * c.embed_dim + (c.context * c.embed_dim + 1) * c.hidden_dim
                + (c.hidden_dim + 1) * c.out_dim + c.out_dim + c.out_dim * c.vocab_size)

    def to_json(self) -> dict:
        return {"architectures": ["MLPDraft"], "model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> "MLPDraftConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class MLPDraft(nn.Module):
    """logits = head(norm(W2 silu(W1 [e(t-c+1); ...; e(t)] + b1) + b2)): no attention, no cache."""

    def __init__(self, config: MLPDraftConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.fc1 = nn.Linear(c.context * c.embed_dim, c.hidden_dim)
        self.fc2 = nn.Linear(c.hidden_dim, c.out_dim)
        self.norm = nn.RMSNorm(c.out_dim, eps=1e-5)
        self.head = nn.Linear(c.out_dim, c.vocab_size, bias=False)
        self.name = "mlp-draft"

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """context: [B, context] token ids (oldest first) -> next-token logits [B, V]."""
        x = self.embed(context).flatten(1)
        return self.head(self.norm(self.fc2(F.silu(self.fc1(x)))))

    def contexts(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The context windows [N, context] ending at `positions` of the 1-D `ids` (padded at the start)."""
        c = self.config.context
        j = positions[:, None] + torch.arange(-c + 1, 1, device=positions.device)
        return torch.where(j >= 0, ids[j.clamp(min=0)], self.config.pad_token_id)

    @torch.inference_mode()
    def propose(self, tokens: list[int], k: int) -> list[int]:
        """k greedy draft tokens after `tokens`, one cheap step each."""
        c = self.config.context
        window = list(tokens[-c:])
        window = [self.config.pad_token_id] * (c - len(window)) + window
        ctx = torch.tensor([window], device=self.device)
        out = []
        for _ in range(k):
            d = greedy(self(ctx))                          # [1]
            out.append(d)
            ctx = torch.cat([ctx[:, 1:], d[:, None]], dim=1)
        return torch.cat(out).tolist() if out else []      # one device-to-host copy for all k

    @torch.inference_mode()
    def propose_many(self, token_lists: list[list[int]], ks: list[int]) -> list[list[int]]:
        """`propose` for several sequences at once (the engine's rows): one batched step per draft
        token, ks[b] tokens for sequence b."""
        c, pad = self.config.context, self.config.pad_token_id
        if not token_lists or max(ks, default=0) <= 0:
            return [[] for _ in token_lists]
        ctx = torch.tensor([[pad] * (c - len(t[-c:])) + list(t[-c:]) for t in token_lists], device=self.device)
        out = []
        for _ in range(max(ks)):
            d = greedy(self(ctx))                          # [B]
            out.append(d)
            ctx = torch.cat([ctx[:, 1:], d[:, None]], dim=1)
        rows = torch.stack(out, 1).tolist()                # one copy to the host
        return [row[:k] for row, k in zip(rows, ks)]

    def save(self, folder: str | Path, tokenizer_folder: str | Path | None = None) -> Path:
        """config.json + model.safetensors (+ the target's tokenizer files)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = self.config.to_json()
        cfg["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer_folder is not None:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(tokenizer_folder) / name).exists():
                    shutil.copyfile(Path(tokenizer_folder) / name, folder / name)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device=None, dtype: torch.dtype | None = None) -> "MLPDraft":
        folder = Path(folder)
        cfg = MLPDraftConfig.from_json(json.loads((folder / "config.json").read_text()))
        path = folder / "model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{folder} has no model.safetensors (an MLP draft is stored as "
                                    "safetensors only); train one with `python -m llmopt.draft`")
        state = load_file(str(path))
        model = cls(cfg)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"weights in {folder} do not match its config.json: {e}") from None
        model.name = folder.name
        return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def is_mlp_draft_folder(hf_config: dict) -> bool:
    return hf_config.get("model_type") == MODEL_TYPE


# ---- distillation: learn the target's greedy choice --------------------------------------------

@torch.inference_mode()
def target_labels(target, ids: torch.Tensor, *, window: int = 256, overlap: int = 64,
                  batch_size: int = 32) -> torch.Tensor:
    """The target's greedy next token after every position of the 1-D `ids`.

    Windows of `window` tokens overlap by `overlap`, so every label but the first few
    sees at least `overlap` tokens of context.
    """
    labels = torch.empty(len(ids), dtype=torch.long)
    stride = window - overlap
    starts = list(range(0, max(1, len(ids) - overlap), stride))
    for i in tqdm(range(0, len(starts), batch_size), desc="target labels", mininterval=10):
        chunk = starts[i:i + batch_size]
        rows = [ids[s:s + window] for s in chunk]
        x = torch.stack([F.pad(r, (0, window - len(r))) for r in rows]).to(target.device)
        best = target(x).argmax(-1).cpu()
        for s, r, b in zip(chunk, rows, best):
            keep = 0 if s == 0 else overlap
            labels[s + keep:s + len(r)] = b[keep:len(r)]
    return labels


def sample_target_text(target, tokenizer, ids: torch.Tensor, *, sequences: int, new_tokens: int = 240,
                       prompt_tokens: int = 16, temperature: float = 0.8, batch_size: int = 64,
                       seed: int = 0) -> torch.Tensor:
    """Text the target writes itself (prompts cut from `ids`), as one 1-D id tensor, rows separated by EOS.

    The draft meets the target's own text at generation time, so it learns from it too.
    """
    from .batching import generate_batch
    g = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    out: list[int] = []
    for b in tqdm(range(0, sequences, batch_size), desc="target samples", mininterval=10):
        n = min(batch_size, sequences - b)
        starts = torch.randint(0, len(ids) - prompt_tokens, (n,), generator=g).tolist()
        prompts = [tokenizer.decode(ids[s:s + prompt_tokens].tolist()) for s in starts]
        gens = generate_batch(target, tokenizer, prompts, max_new_tokens=new_tokens, temperature=temperature,
                              seed=[seed * 1_000_003 + b + i for i in range(n)], ignore_eos=True)
        for gen in gens:
            out += gen.prompt_ids + gen.token_ids + [eos]
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def agreement(draft: MLPDraft, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 8192) -> float:
    """How often the draft's greedy token equals the target's (teacher-forced over `ids`)."""
    hits = 0
    for s in range(0, len(ids), batch_size):
        pos = torch.arange(s, min(len(ids), s + batch_size))
        hits += int((draft(draft.contexts(ids, pos)).argmax(-1) == labels[pos]).sum())
    return hits / len(ids)


def train_draft(target, tokenizer, *, config: MLPDraftConfig | None = None, epochs: float = 3.0,
                sampled_sequences: int = 2560, batch_size: int = 1024, lr: float = 3e-3,
                weight_decay: float = 0.01, seed: int = 0, max_train_tokens: int | None = None,
                max_eval_tokens: int | None = None, log=print) -> tuple[MLPDraft, dict]:
    """Distil `target` into an `MLPDraft`: (draft, report with agreement on held-out works)."""
    from .train import split_ids
    t0 = time.perf_counter()
    config = config or MLPDraftConfig(vocab_size=target.config.vocab_size,
                                      pad_token_id=tokenizer.eos_token_id or 0,
                                      eos_token_id=tokenizer.eos_token_id)
    train = split_ids(tokenizer, "train")[:max_train_tokens]
    parts = [(train, target_labels(target, train))]
    if sampled_sequences:
        own = sample_target_text(target, tokenizer, train, sequences=sampled_sequences, seed=seed)
        parts.append((own, target_labels(target, own)))
    ids = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    data_seconds = time.perf_counter() - t0
    log(f"{len(ids):,} labelled positions ({len(train):,} corpus, {len(ids) - len(train):,} "
        f"sampled from the target) in {data_seconds:.0f}s")

    torch.manual_seed(seed)
    draft = MLPDraft(config).train()
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, int(epochs * len(ids) / batch_size))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, min(200, steps // 10))
    history = []
    t_train = time.perf_counter()
    for step in tqdm(range(steps), desc="train draft", mininterval=10):
        for group in opt.param_groups:      # linear warm-up, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        pos = torch.randint(0, len(ids), (batch_size,), generator=gen)
        loss = F.cross_entropy(draft(draft.contexts(ids, pos)), labels[pos])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 1000 == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": round(loss.item(), 4),
                            "seconds": round(time.perf_counter() - t_train, 1)})
    draft.eval()
    report = {"config": config.to_json(), "n_params": sum(p.numel() for p in draft.parameters()),
              "epochs": epochs, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_positions": len(ids), "corpus_tokens": len(train), "sampled_sequences": sampled_sequences,
              "history": history, "data_seconds": round(data_seconds, 1),
              "train_seconds": round(time.perf_counter() - t_train, 1)}
    for split in ("validation", "test"):
        held = split_ids(tokenizer, split)[:max_eval_tokens]
        report[f"{split}_agreement"] = round(agreement(draft, held, target_labels(target, held)), 4)
    report["machine"] = f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
    if target.device.type == "cuda":        # the target labelled and wrote text there; the draft trained on the CPU
        report["machine"] += f", target on {torch.cuda.get_device_name(target.device)}"
    return draft, report


def write_report_md(folder: Path, report: dict, target_name: str) -> Path:
    c = report["config"]
    lines = [f"# {folder.name}: training report", "",
             f"- Architecture: `MLPDraft` (llmopt's own, `llmopt/draft.py`; not a `transformers` model), "
             f"{report['n_params']:,} parameters: the last {c['context']} tokens' embeddings ({c['embed_dim']} "
             f"each) -> {c['hidden_dim']} SiLU -> {c['out_dim']} -> RMSNorm -> vocabulary {c['vocab_size']}.",
             f"- Distilled from `{target_name}`: trained to predict the target's greedy next token (not the "
             f"corpus's) on the Shakespeare training split (`data/shakespeare`, see its SOURCE.md; "
             f"{report['corpus_tokens']:,} tokens) and on {report['sampled_sequences']:,} passages the target "
             f"sampled itself (temperature 0.8), {report['train_positions']:,} positions in all.",
             f"- Run: `python -m llmopt.draft --target {target_name} --out {folder.as_posix()}` (seed "
             f"{report['seed']}, {report['epochs']} epochs, batch {report['batch_size']}, AdamW lr "
             f"{report['lr']} with cosine decay): labels {report['data_seconds'] / 60:.1f} minutes, training "
             f"{report['train_seconds'] / 60:.1f} minutes on {report['machine']}.",
             f"- Agreement with the target's greedy token on held-out works (teacher-forced): validation "
             f"**{report['validation_agreement']:.3f}**, test **{report['test_agreement']:.3f}**.", "",
             "| step | train loss | seconds |", "|---|---|---|"]
    lines += [f"| {h['step']} | {h['loss']} | {h['seconds']} |" for h in report["history"]]
    path = folder / "TRAINING.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmopt.draft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="tiny", help="the target model (an embedded name or a folder)")
    p.add_argument("--out", required=True, help="folder to write the draft to")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--sampled-sequences", type=int, default=2560,
                   help="passages of 240 tokens the target writes for the draft to learn from (0: none)")
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--out-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-tokens", type=int, help="use only this many corpus tokens (quick runs)")
    p.add_argument("--max-eval-tokens", type=int, help="score agreement on only this many held-out tokens")
    p.add_argument("--device", default="auto",
                   help="where the target runs to label and write text: 'auto' (a GPU when there is one), "
                        "'cpu', 'cuda:N'; the small draft trains on the CPU")
    args = p.parse_args(argv)
    if args.epochs <= 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    for name in ("context", "embed_dim", "hidden_dim", "out_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sampled_sequences < 0:
        p.error(f"--sampled-sequences must be >= 0, got {args.sampled_sequences}")
    from .load import load_model, resolve
    try:
        target, tok = load_model(args.target, device=args.device)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    cfg = MLPDraftConfig(vocab_size=target.config.vocab_size, context=args.context, embed_dim=args.embed_dim,
                         hidden_dim=args.hidden_dim, out_dim=args.out_dim,
                         pad_token_id=tok.eos_token_id if tok.eos_token_id is not None else 0,
                         eos_token_id=tok.eos_token_id)
    draft, report = train_draft(target, tok, config=cfg, epochs=args.epochs,
                                sampled_sequences=args.sampled_sequences, seed=args.seed,
                                max_train_tokens=args.max_train_tokens, max_eval_tokens=args.max_eval_tokens)
    out = draft.save(args.out, tokenizer_folder=resolve(args.target))
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_report_md(out, report, str(args.target))
    print(f"wrote {out}: validation agreement {report['validation_agreement']:.3f}, "
          f"test {report['test_agreement']:.3f}")


if __name__ == "__main__":
    main()
