"""Weight-only quantization written out: int8 per channel, int4 group-wise (notebook 06).

Decoding at batch 1 reads every weight once per token, so storing weights in
fewer bits makes each step read fewer bytes. The matmul still runs in the
activations' dtype: weights are dequantized on the fly (reference path) or
inside a fused kernel (PyTorch's `_weight_int8pack_mm` / int4pack ops).

    from llmopt.quantize import quantize, model_bytes
    quantize(model, "int8")                     # symmetric absmax, one scale per output channel
    quantize(model, "int4", group_size=64)      # asymmetric (zero point), one scale+zero per group
    quantize(model, "int4", symmetric=True)     # symmetric int4
    model_bytes(model)                          # every byte the model holds, scales included

(`llmopt.quantize` is this module; the function is `llmopt.quantize.quantize`.)

The quantizers apply to every `nn.Linear` (llmopt's or a `transformers` model's) and,
unless `embeddings=False`, to the input embedding table; norms stay in full precision.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import gemv
from .model import Transformer, as_linear, check_unquantized, is_conv1d, is_linear

METHODS = ("int8", "int4")
# how int8 layers decode one row: PyTorch's ops ("auto"), llmopt's Triton GEMV, or that GEMV with
# each layer's norms, SwiGLU and residual adds folded in
KERNELS = ("auto", "triton", "triton-folded")

_FROZEN = False   # True while a decode step is traced with its weights frozen into constants


@contextlib.contextmanager
def frozen_weights():
    """Code traced inside runs with its weights frozen into the graph (Inductor's freezing, used
    by `generate(..., compile="max-autotune")` on a CPU): a quantized layer may then compute a
    kernel's own weight layout from its buffers, since freezing folds that into a constant once."""
    global _FROZEN
    before, _FROZEN = _FROZEN, True
    try:
        yield
    finally:
        _FROZEN = before


# -- int8: symmetric, per output channel ---------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale [N]) with w ~= q * scale; |error| <= scale / 2."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12).float() / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


# -- int4: group-wise, two values per byte -------------------------------------------------

def quantize_int4(w: torch.Tensor, group_size: int = 64, symmetric: bool = False):
    """w [N, K] -> (q uint8 [N, K] in 0..15, scale [N, K/g], zero [N, K/g]) with
    w ~= (q - 8) * scale + zero for each group of `group_size` inputs.

    Asymmetric: the group's [min, max] maps onto 0..15 (zero point = the value of code 8).
    Symmetric: zero = 0 and scale = absmax / 7, so codes 1..15 stand for -7..7.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features ({K}) must be a multiple of group_size ({group_size}); "
                         "choose a group size that divides it (e.g. 32, 64, 128)")
    g = w.float().reshape(N, K // group_size, group_size)
    if symmetric:
        scale = g.abs().amax(-1).clamp(min=1e-12) / 7
        zero = torch.zeros_like(scale)
        q = torch.round(g / scale[..., None]).clamp(-7, 7) + 8
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo).clamp(min=1e-12) / 15
        zero = lo + 8 * scale
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(N, K), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    groups = scale.shape[1]
    g = (q.float().reshape(N, groups, K // groups) - 8) * scale[..., None] + zero[..., None]
    return g.reshape(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 -> [N, K/2] bytes: even column in the low nibble, odd in the high."""
    return (q[:, ::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


# -- Linear layers that hold quantized weights ----------------------------------------------

class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b, with q int8 [N, K] and one scale per output channel."""

    def __init__(self, linear: nn.Linear, fused: bool | None = None, kernel: str = "auto") -> None:
        super().__init__()
        q, scale = quantize_int8(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        # auto (None) never picks the packed int8 kernel: on an H100 (torch 2.11) it was the
        # slower path, 17.6 ms per 1B-shape decode step vs 12.6 ms for the reference path;
        # on the 2-core Xeon CPU 7-16x slower than a dense matmul. True still forces it.
        self.fused = bool(fused) and _int8_kernel_ok(linear.weight.device, linear.weight.dtype)
        # "triton": one activation row (a decode step at batch 1) goes through llmopt's own
        # Triton GEMV (llmopt.kernels.gemv); more rows take the paths below
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton" and x.numel() == x.shape[-1]:
            y = gemv(x.reshape(-1), self.weight, self.scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        # Compiled bf16 on a CPU also takes the packed op, which Inductor with frozen weights
        # and max_autotune times against its C++ weight-only-int8 GEMM template (generate's
        # compile="max-autotune"). Any other form would be constant-folded by freezing into a
        # bf16 weight, twice the bytes (2-core Xeon, ~100M shape: 10.0 ms a token that way,
        # 4.7-7.7 ms this way over our runs; notebook 06).
        if self.fused or (torch.compiler.is_compiling() and x.device.type == "cpu"
                          and x.dtype == torch.bfloat16 and self.scale.dtype == x.dtype):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif torch.compiler.is_compiling() and x.numel() <= 4 * x.shape[-1]:
            # Decoding under torch.compile (a few rows): multiply and sum, which Inductor fuses
            # into one kernel that reads the int8 weights once and never writes a full-precision
            # copy. On the 2-core Xeon (~100M shape) this step took 10-12 ms against 46-52 ms for
            # the matmul form below and 18-20 ms for compiled fp32. The matmul form is also what
            # Inductor's weight-only pass rewrites into _weight_int8pack_mm in bf16, which took
            # 120-190 us a call on an H100 (results/gpu-NVIDIA-H100-80GB-HBM3-2026-11-26).
            y = (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1) * self.scale
        else:  # reference: int8 -> activation dtype, matmul, scale each output channel
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y + self.bias if self.bias is not None else y


class Int4Linear(nn.Module):
    """y = x @ dequant(q)^T + b, q packed two per byte, one (scale, zero) per group of inputs."""

    def __init__(self, linear: nn.Linear, group_size: int = 64, symmetric: bool = False,
                 fused: bool | None = None) -> None:
        super().__init__()
        w = linear.weight.detach()
        q, scale, zero = quantize_int4(w, group_size, symmetric)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size, self.symmetric = group_size, symmetric
        self.bias = linear.bias
        self.dtype = w.dtype
        self.fused = _use_fused(fused, w.device) and _int4_kernel_ok(
            w.device, w.dtype, linear.out_features, linear.in_features, group_size)
        if self.fused:
            # the kernel's own layout: still 4 bits per weight; scales and zeros [K/g, N, 2]
            self.register_buffer("weight", _to_int4pack(q, w.device))
            self.register_buffer("scales_and_zeros", _scales_and_zeros(scale, zero).to(self.dtype))
        else:
            self.register_buffer("weight", pack_int4(q))                    # [N, K/2] uint8
            self.register_buffer("scale", scale.to(self.dtype))
            self.register_buffer("zero", zero.to(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A CPU decode step compiled with frozen weights repacks into the layout of PyTorch's CPU
        # int4 kernel. Freezing runs the repacking once, at compile time, so the graph holds
        # 4-bit weights, and max_autotune times Inductor's C++ int4 GEMM template (AVX-512)
        # against ATen's kernel; the dequantize-first form below would be folded into a
        # full-precision copy instead. 2-core Xeon, llama-100m shape, bf16, two A/Bs interleaved
        # in one process: 4.3 vs 6.0 and 6.4 vs 8.0 ms a token against bf16 + int8 compiled the
        # same way (medians of 8; notebook 06).
        repack = (not self.fused and _FROZEN and torch.compiler.is_compiling() and x.device.type == "cpu"
                  and x.dtype in (torch.float32, torch.bfloat16) and self.scale.dtype == x.dtype)
        if self.fused or repack:
            if self.fused:
                w, scales_and_zeros = self.weight, self.scales_and_zeros
            else:
                w = _to_int4pack(unpack_int4(self.weight), x.device)
                scales_and_zeros = _scales_and_zeros(self.scale, self.zero)
            x2 = x.reshape(-1, x.shape[-1])
            if x2.device.type == "cpu":
                y = torch._weight_int4pack_mm_for_cpu(x2, w, self.group_size, scales_and_zeros)
            else:
                y = torch._weight_int4pack_mm(x2, w, self.group_size, scales_and_zeros)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:  # reference: unpack, dequantize the whole matrix, matmul (readable, not fast)
            w = dequantize_int4(unpack_int4(self.weight), self.scale.float(), self.zero.float())
            y = F.linear(x, w.to(x.dtype))
        return y + self.bias if self.bias is not None else y


class QuantEmbedding(nn.Module):
    """Embedding lookup from a quantized [vocab, dim] table (shared with a tied output head).

    Rows are dequantized on lookup: int8 rows times their scale, or int4 rows
    unpacked and mapped through their groups' scale and zero.
    """

    def __init__(self, table: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = "int8" if isinstance(table, Int8Linear) else "int4"
        self.dtype = dtype
        self.register_buffer("weight", table.weight)          # the same tensors: stored once
        self.register_buffer("scale", table.scale)
        if self.kind == "int4":
            self.register_buffer("zero", table.zero)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.flatten()
        if self.kind == "int8":
            rows = self.weight[flat].float() * self.scale[flat].float()[:, None]
        else:
            rows = dequantize_int4(unpack_int4(self.weight[flat]), self.scale[flat].float(),
                                   self.zero[flat].float())
        return rows.to(self.dtype).reshape(*ids.shape, -1)


def _use_fused(fused: bool | None, device: torch.device) -> bool:
    """None (auto): packed kernels on GPUs only (int4; int8 never picks it, see Int8Linear). On the CPUs we measured (a 2-core AVX512/AMX
    Xeon, torch 2.13) `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` ran 7-16x slower
    than a dense fp32 matmul at one token (2048x768: 1.2 / 2.6 ms vs 0.16 ms) and ~100-200x
    slower for a 256-token prefill, so the reference path is the better default there; the
    fastest CPU int8 path we measured is PyTorch's dynamic int8 (`quantize_dynamic_cpu`).
    In bf16 the CPU int4 kernel behaves differently (same Xeon, 2048x768, group 64): 0.08 ms at
    one row against 3.1 ms for the reference path and 0.22 ms dense, 0.99 against 2.9 ms at 32
    rows, but 30 against 6.5 ms at 1,024 rows. Auto keeps CPUs on the reference path, which long
    prompts need; a bf16 model that decodes eagerly from short prompts gains from True. Compiled
    with frozen weights, CPU int4 and bf16 int8 layers take the packed ops either way
    (`frozen_weights`).
    True forces the packed kernel wherever it runs (tests, experiments)."""
    return device.type == "cuda" if fused is None else fused


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, K/g] scales and zeros -> the packed kernels' [K/g, N, 2]."""
    return torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def _to_int4pack(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    return torch._convert_weight_to_int4pack(pack_int4(q), 8)


def _int8_kernel_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """The fused int8 kernel exists for this device and dtype (probed once, never assumed)."""
    return _probe(("int8", device.type, dtype), lambda: torch._weight_int8pack_mm(
        torch.randn(2, 64, device=device, dtype=dtype), torch.ones(32, 64, dtype=torch.int8, device=device),
        torch.ones(32, device=device, dtype=dtype)))


def _int4_kernel_ok(device, dtype, n: int, k: int, group_size: int) -> bool:
    if device.type == "cuda" and (dtype != torch.bfloat16 or k % (group_size * 8) or n % 8):
        return False
    def run():
        q = torch.randint(0, 16, (64, 256), dtype=torch.uint8, device=device)
        sz = torch.ones(256 // group_size, 64, 2, device=device, dtype=dtype)
        x = torch.randn(2, 256, device=device, dtype=dtype)
        w = _to_int4pack(q, device)
        if device.type == "cpu":
            torch._weight_int4pack_mm_for_cpu(x, w, group_size, sz)
        else:
            torch._weight_int4pack_mm(x, w, group_size, sz)
    return _probe(("int4", device.type, dtype, group_size), run)


_PROBES: dict = {}


def _probe(key, fn) -> bool:
    if key not in _PROBES:
        try:
            fn()
            _PROBES[key] = True
        except (RuntimeError, NotImplementedError, AttributeError):
            _PROBES[key] = False
    return _PROBES[key]


def quantize(model: nn.Module, method: str = "int8", *, group_size: int = 64, symmetric: bool = False,
             fused: bool | None = None, embeddings: bool = True, skip: tuple[str, ...] = (),
             kernel: str = "auto") -> nn.Module:
    """Replace every `nn.Linear` (except names in `skip`) with a quantized one, in place (notebook 06).

    `transformers` models of the GPT-2 family keep their projections in `Conv1D` layers
    (the weight stored transposed); those are quantized the same way.

    `fused=None` picks PyTorch's packed kernels where they were measured faster (int4 on
    GPUs) and the readable reference path elsewhere (int8 everywhere, int4 on CPU); True forces the packed kernels wherever this
    device and dtype run them; False forces the reference path. With `embeddings`
    the input embedding table is quantized too: shared with the output head when
    the model ties them (an int4 tied head then runs the reference path, since
    lookups need the readable layout), otherwise stored as int8 rows. Traced for a CPU
    decode step with frozen weights (`generate(..., compile="max-autotune")`), int8 layers
    (bf16) and int4 layers (bf16 or fp32) call PyTorch's packed kernels whatever `fused` says.

    `kernel="triton"` (int8, CUDA) decodes one row at a time through llmopt's own Triton
    GEMV (`llmopt.kernels.gemv`): the int8 tile read once, fp32 accumulation, the
    scale at the end; longer inputs (prefill) keep the paths above. `kernel="triton-folded"`
    (llmopt's own models) also folds each layer's RMSNorms, SwiGLU and residual adds into
    those GEMVs on one-token steps (`llmopt.fold.fold_layers`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r} (bitsandbytes is "
                         "used through transformers: see llmopt.quantize.quantize_bnb)")
    check_unquantized(model, "quantize", "quantize a freshly loaded copy of the full-precision model")
    if method == "int4" and group_size not in (32, 64, 128, 256):
        raise ValueError(f"group_size must be 32, 64, 128 or 256, got {group_size}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        if method != "int8":
            raise ValueError(f"kernel={kernel!r} is an int8 kernel; method {method!r} has none: use kernel='auto'")
        if kernel == "triton-folded" and not isinstance(model, Transformer):
            raise ValueError(f"kernel='triton-folded' folds the norms and adds of llmopt's own layers into the "
                             f"GEMVs; this is a {type(model).__name__}: use kernel='triton'")
        from .kernels import check_triton_device
        check_triton_device(next(model.parameters()).device, f"kernel={kernel!r}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else \
        getattr(model, "embed_tokens", None)
    dtype = emb.weight.dtype if emb is not None else torch.float32
    targets = [(name, m) for name, m in model.named_modules()
               if is_linear(m) and not any(name == s or name.endswith("." + s) for s in skip)]
    if not targets:
        raise ValueError(f"quantize found no linear layers to quantize in this {type(model).__name__} "
                         f"(nn.Linear, or transformers' Conv1D){' outside skip=' + repr(skip) if skip else ''}")
    tied_head = None
    for name, lin in targets:
        lin = as_linear(lin)             # a Conv1D's transposed copy lives one layer at a time
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        tied = embeddings and emb is not None and lin.weight is emb.weight
        if method == "int8":
            new = Int8Linear(lin, fused=fused, kernel="triton" if kernel == "triton-folded" else kernel)
        else:
            new = Int4Linear(lin, group_size=group_size, symmetric=symmetric,
                             fused=False if tied else fused)
        if tied:
            tied_head = new
        setattr(parent, name.rsplit(".", 1)[-1], new)
    if embeddings and emb is not None:
        if tied_head is None:  # untied (or head skipped): the table gets its own int8 rows
            table = nn.Linear(emb.weight.shape[1], emb.weight.shape[0], bias=False,
                              device=emb.weight.device, dtype=emb.weight.dtype)
            table.weight = emb.weight
            tied_head = Int8Linear(table, fused=False)
        _replace_embedding(model, emb, QuantEmbedding(tied_head, dtype))
    if kernel == "triton-folded":
        from .fold import fold_layers
        fold_layers(model)
    model.quantization = {"method": method, "group_size": group_size if method == "int4" else None,
                          "symmetric": symmetric if method == "int4" else True, "skip": skip, "kernel": kernel}
    return model


def int4_group_size(model: nn.Module, preferred: tuple[int, ...] = (64, 128, 32)) -> int | None:
    """The first group size in `preferred` that divides every linear layer's input width (int4
    groups run along it), or None when none does."""
    widths = {m.weight.shape[0] if is_conv1d(m) else m.in_features for m in model.modules() if is_linear(m)}
    return next((g for g in preferred if all(w % g == 0 for w in widths)), None)


def _replace_embedding(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, m in model.named_modules():
        if m is old:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return


def model_bytes(model: nn.Module) -> int:
    """Every byte of parameters and buffers the model holds (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for m in model.modules():  # torch.ao dynamic int8 Linear keeps its weights in packed params
        if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            w = m.weight()
            total += w.numel() * w.element_size() + w.q_per_channel_scales().numel() * 8 \
                if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) \
                else w.numel() * w.element_size() + 8
            if m.bias() is not None:
                total += m.bias().numel() * m.bias().element_size()
    return total


# -- bitsandbytes, through transformers (notebook 06) ------------------------------------------

BNB_MODES = ("int8", "nf4", "fp4")


def quantize_bnb(name_or_path: str = "tiny", mode: str = "nf4", *, device: str = "cpu",
                 compute_dtype: torch.dtype = torch.float32):
    """The same checkpoint loaded by `transformers` with bitsandbytes: LLM.int8 ("int8") or
    4-bit NF4 / FP4 ("nf4", "fp4"). Returns the `transformers` model.

    bitsandbytes runs on CPU too (its 4-bit needs linear dimensions that are multiples
    of 32). A missing package is reported with the command that installs it.
    """
    import logging
    import warnings
    if mode not in BNB_MODES:
        raise ValueError(f"mode must be one of {BNB_MODES}, got {mode!r}")
    missing = [m for m in ("bitsandbytes", "accelerate") if not _importable(m)]
    if missing:
        raise ImportError(f"bitsandbytes quantization needs {' and '.join(missing)}: "
                          f"pip install {' '.join(missing)}")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from .load import resolve
    # bitsandbytes logs a line per matmul on CPU ("inputs will be cast ..."): silence it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    if mode == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode,
                                 bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(str(resolve(name_or_path)), quantization_config=cfg,
                                                 device_map=device)
    return model.eval()


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


# -- PyTorch's CPU dynamic int8 (notebook 06) ---------------------------------------------------

def quantize_dynamic_cpu(model: nn.Module) -> nn.Module:
    """PyTorch's CPU dynamic int8 quantization of every nn.Linear (weights int8, activations
    quantized per batch on the fly), when the installed torch still has it. Its kernels take
    fp32 activations: a bf16 / fp16 model is cast to fp32 first (it gave "expected scalar type
    Float but found BFloat16" at the first forward).

    `torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao; its
    deprecation warning is caught and a clear error is raised if it is gone.
    """
    import warnings
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:
        raise NotImplementedError("this torch has no torch.ao.quantization.quantize_dynamic; use "
                                  "llmopt.quantize.quantize(model, 'int8') instead") from e
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("PyTorch's dynamic int8 quantization runs on CPU only: move the model "
                         "to the CPU, or use llmopt.quantize.quantize(model, 'int8') on the GPU")
    if next(model.parameters()).dtype != torch.float32:
        model = model.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
