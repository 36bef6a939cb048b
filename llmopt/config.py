"""Model configuration: one dataclass, validated, with named presets (notebook 00).

A `ModelConfig` describes a Llama-family decoder. It converts to and from the
`config.json` that Hugging Face `transformers` writes, so the same numbers load
in both libraries.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Architectures whose checkpoints llmopt's decoder can run. They differ only in
# small switches: Qwen2 adds a bias to q/k/v; Mistral is Llama with its own name.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def check_count(value, name: str, *, optional: bool = False) -> None:
    """Raise a ValueError naming `name` unless `value` is an integer >= 1 (or None when `optional`).

    Every count llmopt takes (tokens, steps, slots, samples, processes) is checked this way;
    True and False are refused although Python counts them as integers."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if optional else ''}, got {value!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256                  # hidden size
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4             # < n_heads means grouped-query attention
    intermediate_size: int = 768    # SwiGLU hidden width
    max_seq_len: int = 2048         # context length (positions the model accepts)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3 style {"rope_type": "llama3", "factor": ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False    # q/k/v bias (Qwen2)
    head_dim: int | None = None     # defaults to dim // n_heads
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other HF keys, kept for round trips

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                     "intermediate_size", "max_seq_len"):
            check_count(getattr(self, name), name)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), "
                                 "or give head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; llmopt runs "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3", "linear"):
                raise ValueError(f"unsupported rope scaling {kind!r}; llmopt supports "
                                 "'llama3' and 'linear'")

    @property
    def n_params(self) -> int:
        """Parameter count, embeddings included once when tied."""
        d, h, kv, hd = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        return self.n_layers * per_layer + d + emb * (1 if self.tie_embeddings else 2)

    @classmethod
    def of(cls, obj) -> "ModelConfig":
        """The config of `obj`: a ModelConfig, an llmopt model, a `transformers` model or config,
        or a config.json dict, so the roofline helpers take a user's own model too."""
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, dict):
            return cls.from_hf(obj)
        if hasattr(obj, "to_dict") and hasattr(obj, "model_type"):    # transformers PretrainedConfig
            return cls.from_hf(obj.to_dict())
        if getattr(obj, "config", None) is not None:                   # a model
            return cls.of(obj.config)
        raise TypeError(f"expected a ModelConfig, a model or a transformers config, got {type(obj).__name__}")

    # -- Hugging Face config.json round trip ---------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (Llama, Mistral, Qwen2)."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else {
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}.get(hf.get("model_type", ""), str(hf.get("model_type")))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} (model_type "
                             f"{hf.get('model_type')!r}); llmopt loads "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
        act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise ValueError(f"this {arch} uses the activation {act!r}; llmopt's MLP is SwiGLU (silu), so "
                             "its outputs would be wrong: use transformers for this checkpoint")
        # transformers 5 keeps rope settings in `rope_parameters`; 4.x used
        # `rope_theta` plus `rope_scaling`.
        rope = hf.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling")
        if rope and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        if hf.get("sliding_window") and hf.get("use_sliding_window", arch == "MistralForCausalLM"):
            # Mistral's sliding window only matters past the window; we refuse to be
            # silently wrong beyond it by capping the context at the window.
            max_len = min(hf.get("max_position_embeddings", 2048), hf["sliding_window"])
        else:
            max_len = hf.get("max_position_embeddings", 2048)
        known = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                 "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
                 "tie_word_embeddings", "attention_bias", "head_dim", "architectures",
                 "bos_token_id", "eos_token_id", "model_type"}
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            intermediate_size=hf["intermediate_size"], max_seq_len=max_len,
            rope_theta=float(theta), rope_scaling=scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            head_dim=hf.get("head_dim"), architecture=arch,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            extra={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that `transformers` loads as `LlamaForCausalLM` etc."""
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                      "Qwen2ForCausalLM": "qwen2"}[self.architecture]
        hf = dict(self.extra)
        hf.update({
            "architectures": [self.architecture], "model_type": model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_seq_len, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "attention_bias": self.attention_bias, "mlp_bias": False, "head_dim": self.head_dim,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        })
        return hf

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Named presets. `tiny` and `tiny-draft-llama` are the embedded, trained models (data/);
# the others are real models' shapes for random-weight speed runs, labelled as such.
PRESETS: dict[str, ModelConfig] = {
    # ~4.2M parameters: every linear dimension a multiple of 32 (bitsandbytes 4-bit on CPU).
    "tiny": ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                        intermediate_size=768, max_seq_len=2048, tie_embeddings=True),
    # A transformer draft for speculative decoding: two narrow layers, same tokenizer. (The
    # embedded `tiny-draft` is an MLP, llmopt.draft: far cheaper per step on a CPU.)
    "tiny-draft-llama": ModelConfig(vocab_size=4096, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=384, max_seq_len=2048, tie_embeddings=True),
    # Real shapes (random weights: speed only).
    "llama-3.2-1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32,
                                n_kv_heads=8, intermediate_size=8192, max_seq_len=131072,
                                rope_theta=500000.0, tie_embeddings=True, norm_eps=1e-5,
                                rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192}),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                                n_kv_heads=2, intermediate_size=4864, max_seq_len=32768,
                                rope_theta=1000000.0, tie_embeddings=True, attention_bias=True,
                                norm_eps=1e-6, architecture="Qwen2ForCausalLM"),
    "smollm2-360m": ModelConfig(vocab_size=49152, dim=960, n_layers=32, n_heads=15,
                                n_kv_heads=5, intermediate_size=2560, max_seq_len=8192,
                                rope_theta=100000.0, tie_embeddings=True),
    # ~100M parameters, for CPU speed runs that are bigger than tiny but still quick.
    "llama-100m": ModelConfig(vocab_size=32000, dim=768, n_layers=8, n_heads=12, n_kv_heads=4,
                              intermediate_size=2048, max_seq_len=4096),
}


def get_config(name: str) -> ModelConfig:
    """A copy of the named preset; raises with the list of names when unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
