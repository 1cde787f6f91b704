#!/usr/bin/env bash
# The benchmark runner as on an x86-64 CPU without AVX-512, on a CPU with it: grpo_kernels' AVX2 copy of the
# cpu kernels, torch's own kernels and inductor's generated code at AVX2, MKL and oneDNN capped at AVX2. The
# cores, caches and memory stay this machine's, so it tells the vector width's share of a time, not another
# CPU's. The result records the caps (environment.isa_limits, torch_cpu_capability).
#   benchmarks/avx2.sh --preset cpu-small [runner options]
set -euo pipefail
export GRPO_KERNELS_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
# A cache of inductor's own: its on-disk cache does not key on ATEN_CPU_CAPABILITY, and code it compiled at one
# vector width, loaded at the other, reads garbage indices or corrupts the heap (torch 2.13).
export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/torchinductor_avx2_$(id -un)"
exec "${PYTHON:-python}" -m benchmarks.run "$@"
