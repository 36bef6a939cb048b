"""Mixed precision: casting, autocast, capability checks and what each dtype costs (notebook 05).

fp16 and bf16 halve the bytes per weight (so a memory-bound decode step can run
up to twice as fast) and run on tensor cores on GPUs. They differ in range:
fp16 keeps 10 mantissa bits but overflows above 65,504; bf16 keeps fp32's 8
exponent bits (range to ~3e38) with only 7 mantissa bits.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def as_dtype(dtype) -> torch.dtype:
    """'bf16' / 'float16' / torch.float32 ... -> torch.dtype, with a clear error otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of fp32, fp16, bf16 (or the torch dtypes), got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype, as tables print it: fp32, fp16, bf16 (others as torch names them)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype).removeprefix("torch."))


def check_device(device) -> torch.device:
    """`device` as a torch.device, or a ValueError that says why this machine cannot run on it
    (no CUDA build of torch, no GPU visible, a GPU index past the last one).

    "auto" is the first GPU when torch sees one, else the CPU (the notebooks' default)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name: use 'cpu', 'cuda' or 'cuda:N' ({e})") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) is a CPU-only build; use "
                             "device='cpu', or install a CUDA build of torch on a machine with an NVIDIA GPU")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {device!r}: torch has CUDA but sees no GPU here (driver, or "
                             "CUDA_VISIBLE_DEVICES); use device='cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: only {count} GPU(s) visible, cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple's MPS backend is not available here; use device='cpu'")
    return dev


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def dtype_support(device, dtype) -> dict:
    """Can this device compute in `dtype`, and is it native (fast) or emulated (slow)?

    Returns {"supported": bool, "native": bool, "reason": str}.
    """
    device, dtype = torch.device(device), as_dtype(dtype)
    if dtype == torch.float32:
        return {"supported": True, "native": True, "reason": "fp32 runs everywhere"}
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return {"supported": False, "native": False,
                    "reason": f"{torch.cuda.get_device_name(device)} has no bf16 (needs compute "
                              "capability 8.0+, e.g. A100/H100); use fp16 with care or fp32"}
        return {"supported": True, "native": True, "reason": "tensor-core dtype on this GPU"}
    if device.type == "cpu":
        flags = _cpu_flags()
        if dtype == torch.bfloat16:
            native = bool(flags & {"avx512_bf16", "amx_bf16"})
        else:
            native = bool(flags & {"avx512_fp16", "amx_fp16"})
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        return {"supported": True, "native": native,
                "reason": f"this CPU has native {name} instructions" if native else
                f"this CPU has no native {name} arithmetic: PyTorch converts to fp32 around each "
                f"op, so {name} saves memory but usually runs slower than fp32"}
    return {"supported": True, "native": False, "reason": f"untested device type {device.type}"}


def check_dtype(device, dtype, *, strict: bool = False) -> torch.dtype:
    """Refuse an unsupported dtype (ValueError); warn about an emulated one (or refuse if `strict`)."""
    dtype = as_dtype(dtype)
    s = dtype_support(device, dtype)
    if not s["supported"] or (strict and not s["native"]):
        raise ValueError(f"{dtype} on {device}: {s['reason']}")
    if not s["native"]:
        warnings.warn(f"{dtype} on {device}: {s['reason']}", RuntimeWarning, stacklevel=2)
    return dtype


def cast(model: torch.nn.Module, dtype, *, strict: bool = False) -> torch.nn.Module:
    """The model with weights in `dtype` (in place), after a capability check (notebook 05)."""
    device = next(model.parameters()).device
    return model.to(check_dtype(device, dtype, strict=strict))


def autocast(device, dtype):
    """Run ops in `dtype` where it is safe (matmuls) and fp32 where it is not (softmax, norms)."""
    device = torch.device(device)
    dtype = as_dtype(dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    check_dtype(device, dtype)
    return torch.autocast(device.type, dtype=dtype)


def overflow_demo() -> dict:
    """300 x 300 = 90,000: fine in fp32 and bf16 (rounded), inf in fp16 (max 65,504)."""
    out = {}
    for name in ("fp32", "fp16", "bf16"):
        a = torch.tensor([300.0], dtype=DTYPES[name])
        out[name] = float((a * a)[0])
    out["fp16_max"] = float(torch.finfo(torch.float16).max)
    out["bf16_max"] = float(torch.finfo(torch.bfloat16).max)
    out["fp16_eps"] = float(torch.finfo(torch.float16).eps)
    out["bf16_eps"] = float(torch.finfo(torch.bfloat16).eps)
    return out


@torch.no_grad()
def numerics_vs_fp32(model_fp32, model_other, ids: torch.Tensor) -> dict:
    """Logits drift, top-1 agreement and KL of `model_other` against the fp32 model on `ids` [1, T]."""
    import torch.nn.functional as F
    from .metrics import device_of, logits_of
    ref = logits_of(model_fp32, ids.to(device_of(model_fp32))).float().cpu()
    out = logits_of(model_other, ids.to(device_of(model_other))).float().cpu()
    kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True,
                  reduction="batchmean").item() / ids.shape[-1]
    return {"max_abs_logit_diff": (out - ref).abs().max().item(),
            "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "kl_divergence": kl}
