#!/usr/bin/env bash
# Everything one lent GPU session measures, in one call of about 9 minutes (a session has 15 minutes
# of device time, the machine's start included; one call may run 10):
#   1. the suite (benchmarks/gpu.py), every section, 355 s at most (the sections with goals first);
#   2. weight-only int8 / int4 again with Inductor's coordinate-descent tuning of each Triton kernel
#      (compiled int8's reductions ran at about half the copy bandwidth on an H100), 80 s at most;
#   3. llmopt's Triton int8 GEMV on each weight shape of the 1B model, with the block sizes it picks and
#      their neighbours, in GB/s (the kernel profiles of bf16 and int8 were taken on 2026-11-27), 45 s at most;
#   4. the CUDA-only tests: DecodeGraph's recorded and replayed tokens against plain greedy, the
#      Triton GEMV's against the reference int8 path, and the engine's CUDA graphs (recorded per bucket,
#      replayed) against the engine without them and plain greedy, 75 s at most.
# Each step keeps what it finished when its time runs out, and a failed step never stops the next.
# (pytest runs without the project's addopts: the lent machines have no nbval.)
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
step suite 355 "$py" benchmarks/gpu.py "${smoke[@]}" --out "$dest/suite"
TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 \
    step int8-coordinate-descent 80 "$py" benchmarks/gpu.py "${smoke[@]}" --only quantized_decode \
    --out "$dest/int8-coordinate-descent"
step kernels 45 "$py" benchmarks/gpu_kernels.py "${smoke[@]}" --gemv --variants ""
step cuda-tests 75 "$py" -m pytest -q -o addopts="" -p no:cacheprovider tests/test_generate.py tests/test_quantize.py \
    tests/test_batching.py -k cuda
head -n 20 "$dest/suite/gpu_results.md" 2>/dev/null    # the goals table and the seconds per section
