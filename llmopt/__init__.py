"""llmopt: a small, readable library of LLM inference optimizations, with the tools to measure them.

Start with notebook 00: `model, tok = llmopt.load_model("tiny")`, then
`llmopt.generate(model, tok, "ROMEO:", max_new_tokens=64)`.
"""
from . import metrics, plots, profiling, widgets, workload
from .batching import DynamicBatcher, generate_batch
from .bench import ci_mode, to_transformers
from .config import PRESETS, ModelConfig, get_config
from .engine import Engine, RequestHandle
from .fold import fold_layers, unfold_layers
from .generate import Generation, decode_one_token, generate, prefill, stream
from .kv_cache import DynamicKVCache, StaticKVCache, kv_bytes_per_token, kv_cache_bytes, make_cache
from .load import from_transformers, load_model, load_tokenizer, pick_model, save_model
from .model import Transformer, build_model, fuse_projections, unfuse_projections
from .profiling import (device_info, hf_generate, measure, measure_generation, measure_generations,
                        peak_memory, to_frame)
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ModelConfig", "get_config", "Generation", "decode_one_token", "generate",
    "prefill", "stream", "DynamicKVCache", "StaticKVCache", "kv_bytes_per_token",
    "kv_cache_bytes", "make_cache", "load_model", "load_tokenizer", "pick_model", "save_model", "from_transformers", "Transformer",
    "build_model", "fuse_projections", "unfuse_projections", "fold_layers", "unfold_layers",
    "device_info", "hf_generate", "measure", "measure_generation", "measure_generations",
    "peak_memory", "Tokenizer",
    "generate_batch", "DynamicBatcher", "Engine", "RequestHandle", "workload",
    "ci_mode", "to_transformers", "to_frame", "metrics", "plots", "profiling", "widgets",
]
