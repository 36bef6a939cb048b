#!/usr/bin/env bash
# Everything one lent GPU session measures, in one call of about 8 minutes (a session has 15 minutes
# of device time, the machine's start included; one call may run 10):
#   1. the suite (benchmarks/gpu.py), every section, 400 s at most (the sections with goals first, the two
#      goals still missed first of all; on 2026-11-28 the four of them took 331 s; this run adds rows: bf16 and
#      int8 with llmopt's Triton decode attention (rotary and the cache write inside it), and both with each
#      layer's norms, SwiGLU and residual adds folded into the Triton GEMV (llmopt.fold), those with llmopt's
#      kernels launched as programmatic dependent launches (Hopper) and again plainly; then, new, a long
#      prompt arriving mid-decode with and without chunked prefill (seconds); speculation, prefill and
#      bitsandbytes, measured then, come last and may be cut);
#   2. one layer's decode attention, SDPA against llmopt's Triton kernel with several splits, on caches of
#      288 to 4,096 keys, and rotary + cache write + attention compiled around the kernel against all in it
#      (`decode_attention_append`); the 16 folded layers' own kernels in a row (one CUDA graph), bf16 and
#      int8, as dependent launches and plainly (`--chain`); then the kernels of one 16-step CUDA graph of bf16 with
#      fused projections, folded layers and the Triton decode attention, 75 s at most (the GEMV's block
#      sizes, swept on 2026-11-28, are left out: `--gemv`; so is the unfolded step's profile; with
#      dependent launches a kernel's time in the profile includes its wait for the kernel before it);
#   3. the CUDA-only tests: DecodeGraph's recorded and replayed tokens against plain greedy, the
#      Triton GEMV's against the reference int8 path (folded layers too), the Triton decode attention against
#      SDPA (random tensors, and tiny's greedy tokens eager and in a CUDA graph), the engine's CUDA graphs
#      (recorded per bucket, replayed) against the engine without them and plain greedy, bf16 / fp32
#      folded layers against unfolded, and a folded step all in llmopt's kernels with dependent launches and
#      without, 105 s at most (46 s on 2026-11-28, before the attention and fold tests).
# (Inductor's coordinate-descent tuning of compiled int8, run here on 2026-11-28, used its 80 s compiling
# and timed nothing; the Triton GEMV is the int8 path that counts now.)
# Each step keeps what it finished when its time runs out, and a failed step never stops the next.
# (pytest runs without the project's addopts: the lent machines have no nbval; -v names each test as it
# ends, so a step cut by its limit still says which passed.)
# A second call, if device time is left, runs the notebooks as scripts (tools/run_notebooks.py; README).
#   bash benchmarks/gpu_session.sh            # writes $OUT (on a lent machine) or results/gpu-session-<date>/
#   bash benchmarks/gpu_session.sh --smoke    # CPU, seconds (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}          # the lent machine has torch in its python3
dest=${OUT:-results/gpu-session-$(date +%F)}
mkdir -p "$dest"
smoke=()
[[ "${1:-}" == "--smoke" ]] && smoke=(--smoke)
{ nvidia-smi || echo "no nvidia-smi"; "$py" -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
    > "$dest/machine.txt" 2>&1
step() {   # step NAME SECONDS COMMAND...: a log per step, its time and exit status at the end
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$dest/$name-log.txt" 2>&1
    local rc=$?
    echo "[$name] exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$dest/$name-log.txt"
}
step suite 400 "$py" benchmarks/gpu.py "${smoke[@]}" --out "$dest/suite"
step kernels 75 "$py" benchmarks/gpu_kernels.py "${smoke[@]}" --attention --chain \
    --variants bf16-folded-attn --graph-steps 16 --top 20
# (the newest first: a step cut by its limit loses the tests that passed on a card before)
step cuda-tests 105 "$py" -m pytest -v -o addopts="" -p no:cacheprovider tests/test_fold.py tests/test_kernels.py \
    tests/test_quantize.py tests/test_generate.py tests/test_batching.py -k cuda
head -n 20 "$dest/suite/gpu_results.md" 2>/dev/null    # the goals table and the seconds per section
