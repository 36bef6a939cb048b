"""llmopt: a small, readable library of LLM inference optimizations, with the tools to measure them.

Start with notebook 00: `model, tok = llmopt.load_model("tiny")`, then
`llmopt.generate(model, tok, "ROMEO:", max_new_tokens=64)`.

Names load on first use (PEP 562): `import llmopt` is quick, and a process that only
needs `llmopt.data` (a Dask worker tokenizing, notebook 12) never imports torch.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import types

__version__ = "0.1.0"

# each public name and the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(["DynamicBatcher", "generate_batch"], "batching"),
    **dict.fromkeys(["ci_mode", "to_transformers"], "bench"),
    **dict.fromkeys(["PRESETS", "ModelConfig", "get_config"], "config"),
    **dict.fromkeys(["Engine", "RequestHandle"], "engine"),
    **dict.fromkeys(["fold_layers", "unfold_layers"], "fold"),
    **dict.fromkeys(["Generation", "Session", "decode_one_token", "generate", "prefill", "stream"], "generate"),
    **dict.fromkeys(["DynamicKVCache", "StaticKVCache", "kv_bytes_per_token", "kv_cache_bytes", "make_cache"],
                    "kv_cache"),
    **dict.fromkeys(["from_transformers", "load_model", "load_tokenizer", "pick_model", "save_model"], "load"),
    **dict.fromkeys(["Transformer", "build_model", "fuse_projections", "unfuse_projections"], "model"),
    **dict.fromkeys(["device_info", "hf_generate", "measure", "measure_generation", "measure_generations",
                     "peak_memory", "to_frame"], "profiling"),
    "Tokenizer": "tokenizer",
}
_SUBMODULES = {m.name for m in pkgutil.iter_modules(__path__)} - {"__main__"}

__all__ = [*_EXPORTS, "metrics", "plots", "profiling", "widgets", "workload"]


def __getattr__(name: str):
    """Import a public name's submodule (or a submodule itself) the first time it is asked for."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


class _Package(types.ModuleType):
    """Importing a submodule sets the package's attribute of that name to it; where a function
    has the submodule's name (`llmopt.generate`, in `llmopt/generate.py`), the function stays."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
