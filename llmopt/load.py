"""Load and save checkpoints as Hugging Face folders, safetensors only (notebook 00).

`load_model("tiny")` gives the embedded model; a local folder of a Llama, Mistral
or Qwen2 checkpoint works the same way; a hub name is read from the local Hugging
Face cache when it is there, else fetched when the machine is online (with
`huggingface_hub`, weights still read as safetensors). `pick_model` says which
checkpoint a notebook runs on. Pickled weights (`pytorch_model.bin`) and remote code
are refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .data import DATA_DIR
from .model import Transformer, check_unfused, check_unquantized, rope_inv_freq
from .precision import as_dtype, check_device
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .draft import MLPDraft

# tiny: the 4-layer target; tiny-draft: the MLP draft built for speculative decoding on a
# CPU (llmopt.draft); tiny-draft-llama: a 2-layer transformer draft, ~4x slower per step here.
EMBEDDED = {"tiny": DATA_DIR / "tiny", "tiny-draft": DATA_DIR / "tiny-draft",
            "tiny-draft-llama": DATA_DIR / "tiny-draft-llama"}


def resolve(name_or_path: str | Path) -> Path:
    """The local folder for an embedded name, a folder path, or a hub name (downloaded)."""
    if str(name_or_path) in EMBEDDED:
        folder = EMBEDDED[str(name_or_path)]
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"embedded model {name_or_path!r} is missing from {folder}; "
                                    "re-clone the repository, or train it "
                                    f"(see {folder.name}/TRAINING.md)")
        return folder
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json)")
        return path
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"no checkpoint at {name_or_path!r}: give 'tiny', 'tiny-draft', 'tiny-draft-llama', "
                                "a local Hugging Face folder, or a hub name like 'org/model'")
    cached = cached_checkpoint(str(name_or_path))
    if cached is not None:  # already downloaded: no network call at all
        return cached
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES))
    except Exception as e:
        raise FileNotFoundError(f"could not fetch {name_or_path!r} from the hub ({e}); offline, "
                                "download it elsewhere and pass the local folder") from e


HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]   # chat_template.jinja: a chat template


def cached_checkpoint(repo_id: str) -> Path | None:
    """The folder of hub checkpoint `repo_id` in the local Hugging Face cache, or None.

    Only a snapshot that has its config and safetensors weights counts; nothing is downloaded.
    The cache is where huggingface_hub keeps it ($HF_HUB_CACHE, by default ~/.cache/huggingface/hub).
    """
    try:
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: the caller decides what that means
        return None
    has_weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    return folder if (folder / "config.json").exists() and has_weights else None


# Real checkpoints `pick_model("auto")` looks for on a GPU, best first: small Llama-family
# models llmopt runs (Llama 3.2 with its rope scaling, Qwen2.5 with attention bias, SmolLM2).
REAL_CHECKPOINTS = ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B",
                    "HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-135M")
# A notebook fine-tunes its model in fp32 with AdamW (notebooks 05 and 07): 16 bytes a
# parameter, 8x a bf16 checkpoint's file, plus activations. A checkpoint is picked only when
# FIT_FACTOR times its files fit in the GPU's memory.
FIT_FACTOR = 10


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def pick_model(model: str = "auto", device="auto", *, candidates=REAL_CHECKPOINTS,
               verbose: bool = True) -> str:
    """The checkpoint a notebook runs on, printed with the reason (every notebook's set-up).

    Anything but "auto" is kept as given. "auto" is `$LLMOPT_MODEL` when that is set;
    else, on a GPU at full size, the first of `candidates` (hub names) already in the
    local Hugging Face cache whose fine-tuning fits the GPU's memory (`FIT_FACTOR` times its
    weight files); else the embedded "tiny". Nothing is downloaded: to run on, say,
    Qwen2.5-0.5B, download it once (`hf download Qwen/Qwen2.5-0.5B`) or set LLMOPT_MODEL
    to a local folder.
    """
    from .bench import ci_mode
    if model != "auto":
        name, why = model, "as set in the parameters cell"
    elif os.environ.get("LLMOPT_MODEL"):
        name, why = os.environ["LLMOPT_MODEL"], "from $LLMOPT_MODEL"
    else:
        name, why = _pick_cached(check_device(device), candidates, ci_mode())
    if verbose:
        print(f"model: {name} ({why})")
    return name


def _pick_cached(device: torch.device, candidates, ci: bool) -> tuple[str, str]:
    """pick_model's "auto" without $LLMOPT_MODEL: (name, why)."""
    if ci:
        return "tiny", "CI sizes (LLMOPT_CI) run the embedded model"
    if device.type != "cuda":
        return "tiny", f"the embedded model on {device.type}; on a GPU a cached real checkpoint is picked"
    total = torch.cuda.get_device_properties(device).total_memory
    for repo in candidates:
        folder = cached_checkpoint(repo)
        weights = _weight_bytes(folder) if folder is not None else None
        if weights is not None and FIT_FACTOR * weights <= total:
            return repo, (f"found in the Hugging Face cache: {weights / 1e9:.1f} GB of weights, "
                          f"{total / 2**30:.0f} GiB on the {torch.cuda.get_device_name(device)}")
    return "tiny", (f"none of {', '.join(candidates)} is in the Hugging Face cache with room to fine-tune "
                    "it on this GPU: download one (`hf download NAME`) or set LLMOPT_MODEL to a folder")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
    hint = (f" It has {', '.join(pickled)}: pickled weights are refused for safety; convert "
            "them to safetensors first.") if pickled else ""
    raise FileNotFoundError(f"{folder} has no model.safetensors (or sharded index).{hint}")


def load_model(name_or_path: str | Path = "tiny", *, device=None,
               dtype: torch.dtype | str | None = None) -> tuple[Transformer | MLPDraft, Tokenizer]:
    """(model, tokenizer) for "tiny", "tiny-draft", a local HF folder or a hub name (notebook 00).

    `dtype` (a torch dtype or "fp32" / "fp16" / "bf16") casts the weights; None keeps the checkpoint's.

    "tiny-draft" (and any folder `python -m llmopt.draft` wrote) gives an `llmopt.draft.MLPDraft`.
    """
    device = check_device(device)
    dtype = as_dtype(dtype) if dtype is not None else None
    folder = resolve(name_or_path)
    hf = json.loads((folder / "config.json").read_text())
    from .draft import MLPDraft, is_mlp_draft_folder
    if is_mlp_draft_folder(hf):
        draft = MLPDraft.load(folder, device=device, dtype=dtype)
        draft.name = str(name_or_path)
        return draft, _tokenizer(folder, hf)
    cfg = _folder_config(folder, hf)
    model = _from_state(cfg, _read_weights(folder), dtype, device, where=str(folder))
    model.name = str(name_or_path)
    return model, _tokenizer(folder, hf)


def load_tokenizer(name_or_path: str | Path = "tiny") -> Tokenizer:
    """The tokenizer `load_model` gives with the model, without reading any weights (notebook 00)."""
    folder = resolve(name_or_path)
    return _tokenizer(folder, json.loads((folder / "config.json").read_text()))


def _tokenizer(folder: Path, hf: dict) -> Tokenizer:
    """A checkpoint folder's tokenizer, with end-of-text (and BOS) ids from its config `hf`."""
    from .draft import MLPDraftConfig, is_mlp_draft_folder
    if is_mlp_draft_folder(hf):
        return Tokenizer.from_folder(folder, eos_token_id=MLPDraftConfig.from_json(hf).eos_token_id)
    cfg = _folder_config(folder, hf)
    return Tokenizer.from_folder(folder, eos_token_id=cfg.eos_token_id, bos_token_id=cfg.bos_token_id)


def _folder_config(folder: Path, hf: dict) -> ModelConfig:
    """A checkpoint folder's config (`hf`, its config.json), with the end-of-sequence ids of its
    generation_config.json where it names them: those are the ones `transformers`' generate stops at (an
    instruct checkpoint's generation_config.json may list an end-of-turn token beside end-of-text)."""
    cfg = ModelConfig.from_hf(hf)
    gen = folder / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
    return cfg.replace(eos_token_id=eos) if eos is not None else cfg


def _from_state(cfg: ModelConfig, hf_state: dict[str, torch.Tensor], dtype, device, *,
                where: str, copy: bool = False) -> Transformer:
    """An llmopt model from weights under Hugging Face names, checked against the config."""
    state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    if dtype is None:
        dtype = state["embed_tokens.weight"].dtype if "embed_tokens.weight" in state else torch.float32
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"weights in {where} do not match a {cfg.architecture} of this config: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        want = model.state_dict()[k].shape
        if v.shape != want:
            raise ValueError(f"weight {k} in {where} has shape {tuple(v.shape)}, the config "
                             f"says {tuple(want)}: config.json and weights disagree")
    # copy=True: the new model never shares storage with the weights handed in (a live model's)
    model.load_state_dict({k: v.to(dtype=dtype, copy=copy) for k, v in state.items() if k in expected},
                          strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)  # built on the meta device above; rebuild for real
    return model.to(device).eval()


def from_transformers(hf_model, tokenizer=None, *, device=None,
                      dtype: torch.dtype | str | None = None) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer): llmopt's model with a copy of a `transformers` model's weights, in memory.

    For a Llama, Mistral or Qwen2 `...ForCausalLM` you already hold (the reverse of
    `to_transformers`), so llmopt's generation, caches, batching engine, compilation
    and speculative decoding run on your model: same logits (tested). `tokenizer`, a
    `transformers` tokenizer, comes back wrapped as llmopt's `Tokenizer` (None stays
    None). `device` and `dtype` default to the model's own (a model a device_map spread over
    several devices needs `device`: llmopt runs on one). Other architectures have
    no llmopt implementation: measure them with `llmopt.hf_generate` and the helpers,
    which take any `transformers` model.
    """
    if not isinstance(hf_model, torch.nn.Module):
        raise TypeError(f"from_transformers takes a transformers model object, got {hf_model!r:.60}; for a "
                        "checkpoint folder (or a hub name) use llmopt.load_model(path)")
    check_unquantized(hf_model, "from_transformers", "convert the full-precision model, then llmopt.quantize it")
    arch = type(hf_model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"from_transformers converts {', '.join(SUPPORTED_ARCHITECTURES)} models, "
                         f"got a {arch}: time it with llmopt.hf_generate, and measure it with the "
                         "helpers (profiling, metrics, quantize), which take any transformers model")
    config = hf_model.config.to_dict()
    config["architectures"] = [arch]
    cfg = ModelConfig.from_hf(config)
    gen = getattr(hf_model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        cfg = cfg.replace(eos_token_id=gen.eos_token_id)
    first = next(hf_model.parameters())
    state = hf_model.state_dict()
    devices = sorted({str(t.device) for t in state.values()})
    if "meta" in devices:
        raise ValueError(f"some weights of this {arch} are not in memory (on the meta device: a device_map "
                         "that offloads to disk or CPU, or a model built empty): load it fully onto real "
                         "devices first, then convert it")
    if device is None and len(devices) > 1:
        raise ValueError(f"this {arch} is spread over {', '.join(devices)} (a device_map); llmopt runs a model "
                         "on one device: pass device= (e.g. device='cuda:0'), where a copy of all its weights "
                         "must fit")
    device = check_device(device) if device is not None else first.device
    dtype = as_dtype(dtype) if dtype is not None else first.dtype
    model = _from_state(cfg, state, dtype, device, where=f"this {arch}", copy=True)
    model.name = getattr(hf_model, "name_or_path", "") or arch
    if tokenizer is not None:
        tokenizer = Tokenizer.from_transformers(tokenizer, eos_token_id=cfg.eos_token_id)
    return model, tokenizer


def save_model(model: Transformer, folder: str | Path, tokenizer=None) -> Path:
    """Write `config.json` + `model.safetensors` (HF names) so `transformers` loads it too."""
    check_unfused(model, "save_model (Hugging Face weight names)")
    check_unquantized(model, "save_model (a Hugging Face checkpoint)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith("lm_head.")}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.detach().contiguous().cpu()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        from .tokenizer import save_tokenizer
        save_tokenizer(tokenizer, folder)
    return folder


__all__ = ["load_model", "save_model", "resolve", "pick_model", "cached_checkpoint", "REAL_CHECKPOINTS",
           "SUPPORTED_ARCHITECTURES"]
