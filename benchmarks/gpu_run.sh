#!/usr/bin/env bash
# The GPU proof in stages, on a machine without a package index (the device tool's H100/H200), each stage
# and each step under a time limit:
#   a     ≤ 180 s  the peers' wheels; the extension built with every core (ninja, MAX_JOBS, sm_90a only);
#                  environment facts; python -m grpo_kernels.check (pytest -m gpu where that is missing);
#                  the headline benchmark cases (preset gpu-headline) against copy bandwidth, Liger,
#                  torch.compile and TRL, then the goal table (benchmarks/gpu_report.py)
#   b     ≤ 240 s  the whole test suite on CUDA (pytest-xdist workers and per-test time limits when installed)
#   tune  ≤ 150 s  benchmarks/tune.py: the Triton launch knobs at the headline shapes
#   c     the rest of DEADLINE: the other cases of the gpu preset (preset gpu-rest)
# Each stage first installs the wheels and builds the extension unless this machine already did.
# After every step the results so far are packed into OUTDIR, so a run cut off anywhere still returns what
# it measured. OUTDIR gets three files (the device tool returns at most 8, 16 MiB each):
#   gpu_run.log      the whole log (the summary last)
#   results.tar.gz   for benchmarks/results/ (python -m benchmarks.gpu_report unpack results.tar.gz: all.csv
#                    merged row by row): all.csv with this run's rows appended, the runs' JSON/MD/PNG,
#                    check-*.json, tune-*.json
#   logs.tar.gz      each step's log, environment facts, JUnit XML of the tests
#
# Usage: benchmarks/gpu_run.sh [--stage a|b|tune|c|all|LIST] [--tuned] [--dry-run] [OUTDIR]
#   --stage    a stage, a comma-separated list run in that order (e.g. a,tune), or all (= a,b,tune,c; default)
#   --tuned    stages after a tune (in this run, or an earlier one on this machine) export its winners
#              (GRPO_KERNELS_TRITON_TUNING)
#   --dry-run  print the plan (stages, steps, time limits, commands) and write nothing
#   OUTDIR     default: $OUT when set (the device tool's folder), else build/gpu_run/out
# Environment: WHEELS (.whl, filled here by benchmarks/fetch_wheels.sh), PYTHON (python3), DEADLINE (570:
#   seconds for the whole run), MAX_JOBS (every core), GPU_RUN_ARCH (9.0a: the build's TORCH_CUDA_ARCH_LIST,
#   one architecture whatever the image exports), GPU_RUN_WORK (build/gpu_run: results/ and logs/, kept
#   between calls on a warm machine), LIMIT_A / LIMIT_B / LIMIT_TUNE (stage limits), MIN_STEP (10: a step
#   with fewer seconds left is skipped).
# Device tool, 15 minutes in all: run(command="benchmarks/gpu_run.sh --stage a,b,tune", carry=[".whl"],
#   timeout_s=600), then at once, while the machine is warm (30 s), run(command="LIMIT_A=150
#   benchmarks/gpu_run.sh --stage a --tuned", carry=[".whl"], timeout_s=170), then give_back.
set -uo pipefail
cd "$(dirname "$0")/.."

stage_list=all
dry_run=0
tuned=0
outdir=
while [ $# -gt 0 ]; do
    case $1 in
        --stage) stage_list=${2:-}; shift 2 || shift ;;
        --stage=*) stage_list=${1#*=}; shift ;;
        --tuned) tuned=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_run.sh: unknown option $1" >&2; exit 2 ;;
        *) outdir=$1; shift ;;
    esac
done
[ "$stage_list" = all ] && stage_list=a,b,tune,c
IFS=, read -r -a stages <<< "$stage_list"
[ ${#stages[@]} -gt 0 ] || { echo "gpu_run.sh: --stage needs a value (a, b, tune, c, all or a list)" >&2; exit 2; }
for s in "${stages[@]}"; do
    case $s in
        a|b|tune|c) ;;
        *) echo "gpu_run.sh: unknown stage '$s' (a, b, tune, c, all or a comma-separated list)" >&2; exit 2 ;;
    esac
done

outdir=${outdir:-${OUT:-build/gpu_run/out}}
work=${GPU_RUN_WORK:-build/gpu_run}
wheels=${WHEELS:-.whl}
python=${PYTHON:-python3}
deadline=${DEADLINE:-570}
limit_a=${LIMIT_A:-180}
limit_b=${LIMIT_B:-240}
limit_tune=${LIMIT_TUNE:-150}
min_step=${MIN_STEP:-10}  # a step with less time than this left is skipped
jobs=${MAX_JOBS:-$(nproc)}
arch=${GPU_RUN_ARCH:-9.0a}  # the build's TORCH_CUDA_ARCH_LIST, whatever the image exports
site=${SITE:-/tmp/site}
results=$work/results
logs=$work/logs
log=$outdir/gpu_run.log
stamp=$(date -u +%Y%m%d-%H%M%S)
# Stage a's implementations, measured in this order: ours (kernel backends, in place or not), the peers of the
# goals, torch.compile last (its compile is the longest wait, and a stage cut at its limit drops what is last).
headline_impls=(ours-triton ours-triton-inplace ours-cuda ours-cuda-inplace liger liger-inplace trl-lm-head trl-utils
                torch-compile)
summary=()
failed=()
stage=
stage_end=0

say() {
    if [ "$dry_run" = 1 ]; then echo "$*"; else echo "$*" | tee -a "$log"; fi
}

# pack: the results and logs so far into OUTDIR (written aside, then moved: never a half-written archive).
pack() {
    local name
    for name in results logs; do
        tar -czf "$work/$name.tar.gz.tmp" -C "$work" "$name" && mv -f "$work/$name.tar.gz.tmp" "$outdir/$name.tar.gz"
    done
}

record() {  # record NAME STATUS SECONDS
    summary+=("$(printf '%-5s %-12s %-16s %4ss' "$stage" "$1" "$2" "$3")")
    [ "$2" = 0 ] || failed+=("$stage/$1 ($2)")
}

# begin STAGE LIMIT|rest: the stage's steps end by LIMIT seconds from now (rest: by DEADLINE), never after DEADLINE.
begin() {
    stage=$1
    if [ "$2" = rest ]; then
        say "stage $stage: limit rest (DEADLINE ${deadline}s)"
        stage_end=$deadline
    else
        say "stage $stage: limit ${2}s"
        stage_end=$((SECONDS + $2))
    fi
    [ "$stage_end" -le "$deadline" ] || stage_end=$deadline
}

# step NAME CAP|rest COMMAND...: COMMAND under the smaller of CAP seconds and what is left of the stage.
step() {
    local name=$1 cap=$2
    shift 2
    if [ "$dry_run" = 1 ]; then
        printf '[%s] %s limit %s: %s\n' "$stage" "$name" "$([ "$cap" = rest ] && echo rest || echo "${cap}s")" "$*"
        return 0
    fi
    local left=$((stage_end - SECONDS)) limit=$cap
    if [ "$cap" = rest ] || [ "$cap" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt "$min_step" ]; then
        say "=== [$stage/$name] skipped: ${left}s left of the stage"
        record "$name" skipped 0
        return 1
    fi
    say "=== [$stage/$name] $(date -u +%T), ${SECONDS}s in, limit ${limit}s: $*"
    local t0=$SECONDS rc
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log" "$logs/$stage-$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || { [ "$rc" = 137 ] && [ $((SECONDS - t0)) -ge "$limit" ]; }; then
        say "=== [$stage/$name] stopped at its ${limit}s limit"
        rc="timeout"
    elif [ "$rc" = 137 ]; then
        say "=== [$stage/$name] killed (SIGKILL before its limit: out of memory?)"
    fi
    record "$name" "$rc" $((SECONDS - t0))
    pack
    [ "$rc" = 0 ]
}

# The peers' wheels (once per machine) and the extension (once per machine and source state).
prepare() {
    if compgen -G "$wheels/*.whl" > /dev/null || [ "$dry_run" = 1 ]; then
        local marker
        marker=$site/.installed-$(ls "$wheels"/*.whl 2>/dev/null | sha1sum | cut -c1-12)
        if [ "$dry_run" = 1 ] || [ ! -f "$marker" ]; then
            step wheels 30 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$site" "$wheels"/*.whl && [ "$dry_run" = 0 ] && mkdir -p "$site" && touch "$marker"
        fi
    else
        say "[$stage] no wheels in $wheels (benchmarks/fetch_wheels.sh): Liger and TRL will be skipped"
    fi
    local key
    key=$(cat setup.py csrc/*.h csrc/*/* 2>/dev/null | sha1sum | cut -c1-16)
    if [ "$dry_run" = 0 ] && [ -f "$work/built-$key" ] && compgen -G "grpo_kernels/_C*.so" > /dev/null; then
        return 0  # built on this machine from these sources
    fi
    # ninja runs MAX_JOBS compiles at once; one architecture (each more is another device compile per .cu)
    step build 100 env MAX_JOBS="$jobs" TORCH_CUDA_ARCH_LIST="$arch" "$python" setup.py build_ext --inplace \
        && [ "$dry_run" = 0 ] && touch "$work/built-$key"
}

# budget RESERVE: the runner's --time-budget, the seconds left of the stage less RESERVE (at least 5).
budget() {
    local s=$((stage_end - SECONDS - $1))
    echo $((s > 5 ? s : 5))
}

use_tuning() {
    if [ "$tuned" = 1 ] && [ -s "$work/tuned.env" ]; then
        export GRPO_KERNELS_TRITON_TUNING
        GRPO_KERNELS_TRITON_TUNING=$(cat "$work/tuned.env")
        say "[$stage] tuned: GRPO_KERNELS_TRITON_TUNING=$GRPO_KERNELS_TRITON_TUNING"
    fi
}

stage_a() {
    begin a "$limit_a"
    prepare
    use_tuning
    step environment 30 "$python" -m benchmarks.gpu_report facts "$logs/environment-$stamp.json"
    if [ -f grpo_kernels/check.py ]; then
        # the headline step times torch.compile itself: the check need not compile it too; its own budget ends
        # it (the report written) before the step's limit. Each option only where this check takes it.
        local options=()
        grep -q '"--compile"' grpo_kernels/check.py && options+=(--compile none)
        grep -q '"--budget"' grpo_kernels/check.py && options+=(--budget 40)
        step check 50 "$python" -m grpo_kernels.check "${options[@]}" --json "$results/check-$stamp.json"
    else
        step gpu-tests 50 "$python" -m pytest -q -m gpu tests -p no:cacheprovider \
            --junitxml "$logs/gpu-tests-$stamp.xml"
    fi
    # the runner starts no case in its last 20 s; the goal table keeps 12 s of the stage
    step headline $((stage_end - SECONDS - 12)) "$python" -m benchmarks.run --preset gpu-headline \
        --impls "${headline_impls[@]}" --out "$results" --time-budget "$(budget 32)"
    step goals 12 "$python" -m benchmarks.gpu_report goals "$results"
}

stage_b() {
    begin b "$limit_b"
    prepare
    # -v: each test's outcome is in the log as it ends, also when the stage's limit cuts the run
    local options=(-v -rfE -p no:cacheprovider --durations=25 --junitxml "$logs/tests-$stamp.xml")
    # 8 workers of 2 threads on the 16 cores
    if "$python" -c "import xdist" 2> /dev/null; then options+=(-n 8); fi
    # no test may hold the stage for longer than 150 s; pytest-timeout ≥ 2.3 also ends the session (between
    # tests) 30 s before the stage's limit, so that the failures' summary and the JUnit XML are written
    if "$python" -c "import pytest_timeout" 2> /dev/null; then options+=(--timeout 150); fi
    local session="import pytest_timeout as t, sys; sys.exit('session_timeout' not in open(t.__file__).read())"
    if "$python" -c "$session" 2> /dev/null; then
        options+=(--session-timeout "$(budget 30)")
    fi
    # the committed defaults, whatever a tune exported
    step tests rest env -u GRPO_KERNELS_TRITON_TUNING OMP_NUM_THREADS=2 "$python" -m pytest "${options[@]}" tests
}

stage_tune() {
    begin tune "$limit_tune"
    prepare
    step tune rest env -u GRPO_KERNELS_TRITON_TUNING "$python" -m benchmarks.tune --budget "$(budget 45)" \
        --json "$results/tune-$stamp.json" --env "$work/tuned.env"
}

stage_c() {
    begin c rest
    prepare
    use_tuning
    step gpu-rest rest "$python" -m benchmarks.run --preset gpu-rest --out "$results" --time-budget "$(budget 45)"
}

if [ "$dry_run" = 1 ]; then
    say "plan: stages ${stages[*]}; DEADLINE ${deadline}s; OUTDIR $outdir (gpu_run.log results.tar.gz logs.tar.gz)"
else
    mkdir -p "$outdir" "$results" "$logs" || exit 1
    : >> "$log"
    # the CSV history, so that the all.csv that comes back is the whole file with this run's rows appended
    [ -f "$results/all.csv" ] || cp benchmarks/results/all.csv "$results/all.csv" 2> /dev/null
    say "=== gpu_run.sh $(date -u +%FT%TZ): stages ${stages[*]}; DEADLINE ${deadline}s; MAX_JOBS $jobs; arch $arch"
fi
export PYTHONUNBUFFERED=1
# the repository (grpo_kernels, benchmarks) and the wheels' install folder
export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH}
# torch builds with ninja when it finds it: in a venv it sits beside the interpreter
PATH=$(dirname "$(command -v "$python" || echo "$python")"):$PATH
for s in "${stages[@]}"; do
    "stage_$s"
done

[ "$dry_run" = 1 ] && exit 0
# the last lines are what the device tool's reply shows: the goal table, the tuner's verdict, the steps
for part in a-goals tune-tune; do
    if [ -s "$logs/$part.log" ]; then
        say ""
        say "=== $part (from $logs/$part.log)"
        tail -n 14 "$logs/$part.log" | tee -a "$log"
    fi
done
say ""
say "=== summary ($(date -u +%T), ${SECONDS}s): stage step status seconds"
for line in "${summary[@]}"; do say "$line"; done
say "failed: ${failed[*]:-none}"
pack
ls -la "$outdir" | tee -a "$log"
[ ${#failed[@]} = 0 ]
