"""The one measurement protocol every notebook and benchmark uses (notebooks 00 and 01).

- warm up first; synchronize the device before reading a clock;
- repeat, report the median with the spread (min, max, p10, p90);
- name the device, dtype and model beside every figure.

Results are plain dicts; `to_frame` turns a list of them into a pandas table.
Works for llmopt models and for a user's own `transformers` model.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch

from .config import ModelConfig, check_count


def synchronize(device=None) -> None:
    """Wait for queued device work, so a clock read after it is honest."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is None and torch.cuda.is_available():
        torch.cuda.synchronize()


def device_info(device=None) -> dict:
    """What ran the measurement: device name, torch version, CPU threads."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def summarize(samples: list[float]) -> dict:
    """Median, spread and count of a list of measurements."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "p10": q[0], "p90": q[-1],
            "repeats": len(s)}


def measure(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, device=None) -> dict:
    """Time `fn()`: warm-up calls, then `repeats` synchronized timings. Seconds, as `summarize`."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return summarize(times)


GENERATION_KEYS = ("ttft_s", "tpot_s", "decode_tokens_per_s", "e2e_s", "e2e_tokens_per_s")


def measure_generation(run: Callable[[], object], *, warmup: int = 1, repeats: int = 3,
                       label: str = "", **context) -> dict:
    """Median TTFT, TPOT, decode tokens/s and end-to-end of a generation callable.

    `run()` returns an object with a `.stats` dict (an llmopt `Generation`, or the
    result of `hf_generate`). The row carries `label` and any `context` given
    (model, dtype, ...) beside the figures, plus the spread of decode tokens/s.
    """
    return measure_generations({label: run}, warmup=warmup, repeats=repeats, **context)[0]


def measure_generations(runs: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 3,
                        **context) -> list[dict]:
    """`measure_generation` for several variants, interleaved: each round runs every variant once.

    On a shared or throttling machine the speed drifts; interleaving exposes all
    variants to the same drift, so their ratio is fairer than timing them one after another.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    results: dict[str, list[dict]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            results[label].append(run().stats)
    rows = []
    for label, stats in results.items():
        row = {"label": label, **context}
        for key in GENERATION_KEYS:
            row[key] = statistics.median(r[key] for r in stats)
        for key in ("device", "dtype"):  # every figure names its device and dtype
            row.setdefault(key, stats[0].get(key, ""))
        tps = summarize([r["decode_tokens_per_s"] for r in stats])
        row.update(decode_tokens_per_s_min=tps["min"], decode_tokens_per_s_max=tps["max"],
                   new_tokens=stats[0]["new_tokens"], prompt_tokens=stats[0]["prompt_tokens"],
                   repeats=repeats)
        rows.append(row)
    return rows


class HFGeneration:
    """Timings (and tokens) of one `transformers` `generate` call, shaped like a `Generation`."""

    def __init__(self, token_ids: list[int], stats: dict) -> None:
        self.token_ids, self.stats = token_ids, stats


def hf_generate(model, input_ids: torch.Tensor, *, max_new_tokens: int, ignore_eos: bool = True,
                **generate_kwargs) -> HFGeneration:
    """Run `transformers`' own `generate` (greedy by default), timing each token as it arrives.

    A streamer receives every new token; we stamp its arrival (after a device
    sync), which gives TTFT and TPOT for any Hugging Face causal LM. `input_ids`: one
    prompt's token ids ([1, T] or [T], a tensor or a list), moved to the model's device.
    """
    from transformers.generation.streamers import BaseStreamer
    from .config import check_count
    from .generate import timing_stats

    if isinstance(input_ids, str) or not isinstance(input_ids, (torch.Tensor, list, tuple)):
        raise TypeError(f"hf_generate takes token ids, got {type(input_ids).__name__}: encode the prompt first, "
                        "hf_generate(model, torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=...)")
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"hf_generate times one prompt: give its ids as [1, T] with T >= 1, got shape "
                         f"{tuple(input_ids.shape)}")
    check_count(max_new_tokens, "max_new_tokens")
    input_ids = input_ids.to(next(model.parameters()).device)
    device = input_ids.device
    start = [0.0]

    class _Clock(BaseStreamer):
        def __init__(self):
            self.times, self.first = [], True

        def put(self, value):
            if self.first:      # the first call carries the prompt
                self.first = False
                return
            synchronize(device)
            self.times.append(time.perf_counter() - start[0])

        def end(self):
            pass

    clock = _Clock()
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, streamer=clock)
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens
    kwargs.update(generate_kwargs)
    synchronize(device)
    start[0] = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    synchronize(device)
    new = out[0, input_ids.shape[1]:].tolist()
    stats = timing_stats(clock.times, input_ids.shape[1])
    stats.update(device=str(device), dtype=str(model.dtype).removeprefix("torch."))
    return HFGeneration(new, stats)


_OPEN_PEAKS: list[list[int]] = []   # per CPU peak_memory in progress: the highest own RSS seen before a reset


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where the kernel has none.
    The mark is the process's, so the peak so far is first handed to the measurements still
    open (a peak_memory inside another's `fn`)."""
    try:
        if _OPEN_PEAKS:
            so_far = _peak_rss()
            for box in _OPEN_PEAKS:
                box[0] = max(box[0], so_far)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM) in bytes, kept by the kernel since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def peak_memory(fn: Callable[[], object], device=None, interval_s: float = 0.002,
                include_children: bool = False) -> dict:
    """Peak memory while `fn()` runs: CUDA allocator peak, or on CPU the process's peak RSS rise.

    On Linux the CPU peak is the kernel's own high-water mark (reset before `fn`),
    so a short spike between two samples is not missed; elsewhere, and for child
    processes, the resident set is sampled every `interval_s`. RSS includes
    everything the process touched (allocator caches too): a rough upper bound.
    `include_children` adds the RSS of child processes (Dask workers, notebook 12)
    and reports the largest single process too (`max_process_bytes`), and the largest
    child (`max_child_bytes`: a worker's peak, without the caller's own memory).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak, "delta_bytes": peak - base, "kind": "cuda allocator"}
    import psutil
    proc = psutil.Process()

    own_command = proc.cmdline()

    def rss() -> tuple[int, int, int]:
        sizes = [proc.memory_info().rss]
        if include_children:
            for child in proc.children(recursive=True):
                try:
                    # a child forked but not yet started on its own program shares all this
                    # process's pages, and its RSS counts them: not a measurement of the child
                    if child.cmdline() != own_command:
                        sizes.append(child.memory_info().rss)
                except psutil.Error:      # a child that just exited
                    pass
        return sum(sizes), max(sizes), max(sizes[1:], default=0)

    own_base = proc.memory_info().rss
    base = rss()[0]
    kernel_peak = _reset_peak_rss()
    own = [own_base]                   # the kernel's peaks from before any reset inside fn
    if kernel_peak:
        _OPEN_PEAKS.append(own)
    peak = [base, 0, 0]                # total, largest process, largest child
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[:] = map(max, peak, rss())
            done.wait(interval_s)

    # sample only what the kernel does not keep (children's RSS, or no high-water mark)
    t = threading.Thread(target=watch, daemon=True) if include_children or not kernel_peak else None
    if t is not None:
        t.start()
    try:
        fn()
    finally:
        done.set()
        if t is not None:
            t.join()
        if kernel_peak:
            _OPEN_PEAKS.remove(own)
    peak[:] = map(max, peak, rss())
    if kernel_peak:   # the sampled total, or the kernel's exact own peak over the same base
        own_peak = max(own[0], _peak_rss())
        peak[0], peak[1] = max(peak[0], base + own_peak - own_base), max(peak[1], own_peak)
    out = {"peak_bytes": peak[0], "delta_bytes": peak[0] - base, "kind": "process RSS"}
    if include_children:
        out.update(kind="RSS of the process and its children", max_process_bytes=peak[1], max_child_bytes=peak[2])
    return out


def probe_bandwidth(device=None, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of `nbytes`), the MBU denominator."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=device)["median"]
    return 2 * nbytes / t


def probe_matmul(device=None, dtype: torch.dtype | None = None, n: int = 1024,
                 repeats: int = 5) -> float:
    """Measured dense matmul rate in FLOP/s for n x n x n, the MFU denominator."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, warmup=2, repeats=repeats, device=device)["median"]
    return 2 * n ** 3 / t


def to_frame(rows: list[dict]):
    """A pandas DataFrame of result rows (one measurement per row)."""
    import pandas as pd
    return pd.DataFrame(rows)


# -- Roofline: what a decode step must cost at least (notebook 01) ----------------------------

def decode_shape(obj) -> dict:
    """What a decode step's cost depends on: weights read as matrices (`matmul_params`: every
    matrix but the input embedding, which a step only looks up), layers and attention heads."""
    try:
        cfg = ModelConfig.of(obj)
    except ValueError:
        if not isinstance(obj, torch.nn.Module) or getattr(obj, "config", None) is None:
            raise
        return _shape_of_any_model(obj)
    return {"matmul_params": cfg.n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim),
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim}


def _shape_of_any_model(model: torch.nn.Module) -> dict:
    """`decode_shape` of a `transformers` model llmopt has no config for: every parameter but the
    embedding tables (a table tied to the output head counts, as the head), and its config's attention."""
    tables = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    tied = {m.weight.data_ptr() for m in model.modules()          # a table another layer uses: the head
            if not isinstance(m, torch.nn.Embedding) and isinstance(getattr(m, "weight", None), torch.Tensor)}
    params = {p.data_ptr(): p.numel() for p in model.parameters()}
    matmul = sum(n for ptr, n in params.items() if ptr not in tables or ptr in tied)
    c = model.config
    try:
        n_layers, n_heads = c.num_hidden_layers, c.num_attention_heads
    except AttributeError as e:
        raise ValueError(f"cannot read layers and heads from this {type(model).__name__}'s config "
                         f"({e}); give roofline a ModelConfig with the same shape") from e
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return {"matmul_params": matmul, "n_layers": n_layers, "n_heads": n_heads,
            "n_kv_heads": getattr(c, "num_key_value_heads", None) or n_heads, "head_dim": head_dim}


def roofline(cfg, dtype: torch.dtype = torch.float32, context: int = 512, batch: int = 1) -> dict:
    """Bytes read and FLOPs done per decode step of `batch` tokens at `context` cached tokens.

    Weights: every matrix is read once per step (the embedding table only as the
    output head, when tied). KV: each row reads its whole cache. FLOPs: 2 per
    weight per token, plus attention's QK^T and AV (4 x layers x heads x head_dim x context).
    `cfg`: a ModelConfig, an llmopt or `transformers` model, or a `transformers` config.
    A `transformers` model of an architecture llmopt does not implement (GPT-2, say) is
    read from the model itself (its linear layers' weights, its config's heads and layers).
    """
    s = decode_shape(cfg)
    bytes_per = torch.finfo(dtype).bits // 8
    matmul_params = s["matmul_params"]
    weight_bytes = matmul_params * bytes_per
    kv_bytes = batch * context * 2 * s["n_layers"] * s["n_kv_heads"] * s["head_dim"] * bytes_per
    attn_flops = 4 * s["n_layers"] * s["n_heads"] * s["head_dim"] * context
    flops_per_token = 2 * matmul_params + attn_flops
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "bytes_per_step": weight_bytes + kv_bytes,
            "flops_per_token": flops_per_token, "flops_per_step": batch * flops_per_token,
            "arithmetic_intensity": batch * flops_per_token / (weight_bytes + kv_bytes)}


def utilization(step_time_s: float, cfg, dtype: torch.dtype, context: int, batch: int = 1, *,
                bandwidth: float, flops_rate: float) -> dict:
    """MBU and MFU of a measured decode step against the device's measured peaks.

    MBU = bytes the step must read / step time / copy bandwidth;
    MFU = FLOPs the step must do / step time / matmul rate.
    """
    r = roofline(cfg, dtype, context, batch)
    return {"mbu": r["bytes_per_step"] / step_time_s / bandwidth,
            "mfu": r["flops_per_step"] / step_time_s / flops_rate,
            "bandwidth_floor_s": r["bytes_per_step"] / bandwidth,
            "compute_floor_s": r["flops_per_step"] / flops_rate}


# -- Attention kernels (notebook 03) --------------------------------------------------------

def sdpa_kernels(device=None, dtype: torch.dtype = torch.float32) -> dict:
    """Which `scaled_dot_product_attention` kernels this device runs for `dtype`: name -> bool.
    A kernel's refusal is the answer here, so the warnings PyTorch gives with it (on a GPU in fp32,
    a dozen "... kernel not used because" lines) are not shown."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    q = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    found = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            found[name.lower()] = True
        except RuntimeError:
            found[name.lower()] = False
    return found


# -- Where the time goes: torch.profiler grouped by kind of work (notebook 01) ------------------

OP_CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax",
                   "masked_fill")),
    # on a GPU the rows are kernels: cuBLAS names its GEMMs "...gemm..." and batch-1 ones "gemv..."
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "gemm", "gemv")),
    ("norm", ("aten::pow", "aten::mean", "aten::rsqrt")),
    ("sampling", ("aten::argmax", "aten::multinomial", "aten::topk", "aten::sort", "aten::cumsum",
                  "_local_scalar_dense", "aten::item")),
)


def categorize(op_name: str) -> str:
    """The kind of work an operator does: attention, matmul, norm, sampling or elementwise."""
    for category, needles in OP_CATEGORIES:
        if any(n in op_name for n in needles):
            return category
    return "elementwise & other"


@contextlib.contextmanager
def _without_profiler_chatter():
    """Drop the "USDT: ... profiler_start / profiler_stop" lines torch 2.13's profiler (kineto)
    writes to the process's stderr at every start and stop (noise under every profiled
    notebook cell); anything else written to stderr meanwhile is passed on afterwards."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:                          # no stderr file descriptor: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def op_breakdown(fn: Callable[[], object], *, device=None, steps: int = 1, warmup: int = 1,
                 trace_path: str | None = None) -> list[dict]:
    """Profile `fn()` and split its time into matmul, attention, norm, elementwise, sampling and
    host overhead (wall time no operator accounts for: Python, dispatch, launches).

    Times are per call of `fn` (divide by `steps` if fn runs several decode steps).
    On CUDA the operator times are device (kernel) times. `trace_path` writes a
    Chrome/Perfetto trace (open in https://ui.perfetto.dev or chrome://tracing).
    """
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(device or "cpu")
    for _ in range(warmup):
        fn()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with _without_profiler_chatter(), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        wall = time.perf_counter() - t0
    if trace_path:
        prof.export_chrome_trace(trace_path)
    per_cat: dict[str, float] = {}
    for ev in prof.key_averages():
        if device.type == "cuda":
            t = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        else:
            t = ev.self_cpu_time_total
        if not ev.key.startswith("aten::") and device.type != "cuda":
            continue
        if t > 0:
            cat = categorize(ev.key)
            per_cat[cat] = per_cat.get(cat, 0.0) + t / 1e6
    busy = sum(per_cat.values())
    per_cat["host overhead"] = max(0.0, wall - busy)
    total = sum(per_cat.values())
    return [{"category": k, "seconds": v / steps, "share": v / total}
            for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])]


# -- Tokens per generate call (notebook 01) -----------------------------------------------------

def tokens_per_call(model, tokenizer, prompt: str, total_tokens: int, per_call: int, *,
                    continuation: bool = False) -> dict:
    """Generate `total_tokens` greedily in calls of `per_call` tokens; where the time goes.

    Without `continuation` each call is a fresh `generate` on the text so far (re-encode,
    allocate a cache, re-prefill everything). With it, one `Session` resumes from its
    cache and prefills only the newest token. The total splits into: a fixed cost per
    call (measured as a 1-token call on a 1-token prompt: `fixed_per_call_s`), prefill beyond that, and decode.
    """
    from .generate import Session, generate
    check_count(per_call, "per_call")
    check_count(total_tokens, "total_tokens")
    one = tokenizer.encode(prompt)[:1]
    fixed = statistics.median(generate(model, tokenizer, one, max_new_tokens=1).stats["e2e_s"]
                              for _ in range(5))
    session = Session(model, tokenizer, prompt) if continuation else None
    text, ids, calls, ttft, decode, prefilled = prompt, [], 0, 0.0, 0.0, 0
    t0 = time.perf_counter()
    while len(ids) < total_tokens:
        n = min(per_call, total_tokens - len(ids))
        if continuation:
            g = session.generate(max_new_tokens=n, ignore_eos=True)
            prefilled += g.stats["prefilled_tokens"]
        else:
            g = generate(model, tokenizer, text, max_new_tokens=n, ignore_eos=True)
            prefilled += g.stats["prompt_tokens"]
            text += g.text                    # the next call re-encodes all of it
        ids += g.token_ids
        ttft += g.stats["ttft_s"]
        decode += g.stats["e2e_s"] - g.stats["ttft_s"]
        calls += 1
    total = time.perf_counter() - t0
    fixed_total = calls * fixed
    return {"per_call": per_call, "calls": calls, "continuation": continuation, "tokens": len(ids),
            "token_ids": ids, "seconds": total, "tokens_per_s": len(ids) / total,
            "fixed_s": fixed_total, "fixed_per_call_s": fixed, "prefill_s": max(0.0, ttft - fixed_total),
            "decode_s": decode, "other_s": max(0.0, total - ttft - decode), "prefilled_tokens": prefilled}
