"""Stand-ins for real checkpoints, made from `tiny` where no hub checkpoint can be fetched.

    python tools/stand_in_checkpoint.py llama3 /tmp/llama3-style
    python tools/stand_in_checkpoint.py qwen2 /tmp/qwen2-style
    LLMOPT_MODEL=/tmp/llama3-style python tools/run_notebooks.py --ci notebooks/0*.ipynb

On a GPU the notebooks pick a real checkpoint (`llmopt.pick_model`); these carry what sets one apart from
`tiny` and changes llmopt's paths, on tiny's trained weights (so the notebooks' quality claims still hold),
written by transformers itself in bf16:
- llama3: a Llama with Llama 3.2's rope scaling (llama3, factor 32, original context 8,192), its
  131,072-token context, and a tokenizer.json whose post-processor adds BOS, as Llama 3's does;
- qwen2: a Qwen2 with biases on q, k and v (random, std 0.02) and no BOS.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def make(kind: str, out: str | Path) -> Path:
    """Write the `kind` ("llama3" or "qwen2") stand-in to the folder `out` (replaced); returns it."""
    import transformers
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from llmopt.tokenizer import with_bos
    if kind not in ("llama3", "qwen2"):
        raise ValueError(f"kind must be 'llama3' or 'qwen2', got {kind!r}")
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    cfg = json.loads((TINY / "config.json").read_text())
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "rope_scaling",
                                                      "attention_bias", "mlp_bias", "head_dim")}
    if kind == "llama3":
        keep["max_position_embeddings"] = 131072
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**keep, head_dim=cfg["head_dim"],
                                                                    rope_scaling=LLAMA3_ROPE))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**keep))
    missing, unexpected = hf.load_state_dict(load_file(TINY / "model.safetensors"), strict=False)
    biases = [k for k in missing if k.endswith(".bias")]
    assert not unexpected and set(missing) <= {"lm_head.weight", *biases}, (missing, unexpected)  # tied head
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in biases:
            hf.get_parameter(name).copy_(torch.randn(hf.get_parameter(name).shape, generator=generator) * 0.02)
    hf.to(torch.bfloat16).save_pretrained(out)
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    if kind == "llama3":
        tok = with_bos(tok, "<|endoftext|>")
    tok.save(str(out / "tokenizer.json"))
    shutil.copy(TINY / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["llama3", "qwen2"])
    p.add_argument("out", help="folder to write (replaced)")
    args = p.parse_args(argv)
    print(make(args.kind, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
