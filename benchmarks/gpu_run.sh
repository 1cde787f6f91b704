#!/usr/bin/env bash
# One command for a GPU machine without a package index: install the peers'
# wheels, build the extension, run the GPU tests, the gpu benchmark preset and
# the full test suite on CUDA; JSON, CSV, markdown, PNG plots and the log go
# into OUTDIR. About 9 minutes at most (each step has a time limit).
#
# Usage: benchmarks/gpu_run.sh [--dry-run] [OUTDIR]
#   OUTDIR   default: $OUT when set (the device tool's folder), else benchmarks/results
#   WHEELS   folder of wheels (default .whl, filled here by benchmarks/fetch_wheels.sh)
#   PYTHON   interpreter (default python3)
#   DEADLINE seconds for the whole run (default 530)
# Device tool: run(command="benchmarks/gpu_run.sh", carry=[".whl"]), then copy
# the returned files into benchmarks/results/ (all.csv comes back with this run appended).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
outdir=${1:-${OUT:-benchmarks/results}}
wheels=${WHEELS:-.whl}
python=${PYTHON:-python3}
deadline=${DEADLINE:-530}
site=/tmp/site
log=$outdir/gpu_run.log
failed=()

# step NAME SECONDS COMMAND...: run COMMAND under a time limit, logging; a failure is recorded, not fatal.
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$dry_run" = 1 ]; then
        echo "[$name] (limit ${limit}s) $*"
        return 0
    fi
    echo "=== [$name] $(date -u +%T) elapsed ${SECONDS}s: $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || failed+=("$name (rc $rc)")
}

# share RESERVE: the seconds left before the deadline less RESERVE, at least 60.
share() { local s=$((deadline - SECONDS - $1)); echo $((s > 60 ? s : 60)); }

[ "$dry_run" = 1 ] || { mkdir -p "$outdir"; : > "$log"; }
export PYTHONUNBUFFERED=1
if compgen -G "$wheels/*.whl" > /dev/null || [ "$dry_run" = 1 ]; then
    step wheels 120 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step build 200 "$python" setup.py build_ext --inplace
step environment 60 "$python" -c "import torch, triton, grpo_kernels; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name(), grpo_kernels.available_backends(), grpo_kernels.extension_info())"
step gpu-tests 90 "$python" -m pytest -q -m gpu tests
if [ -f benchmarks/results/all.csv ] && [ "$outdir" != benchmarks/results ]; then
    step history 10 cp benchmarks/results/all.csv "$outdir/all.csv"  # the CSV history comes back whole
fi
# The benchmark stops starting cases 200 s before the deadline; the full suite gets what is left.
step benchmarks "$(share 160)" "$python" -m benchmarks.run --preset gpu --out "$outdir" --time-budget "$(share 200)"
step all-tests "$(share 10)" "$python" -m pytest -q tests

if [ "$dry_run" = 1 ]; then exit 0; fi
echo "=== done in ${SECONDS}s; failed: ${failed[*]:-none}" | tee -a "$log"
[ ${#failed[@]} = 0 ]
