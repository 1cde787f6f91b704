"""Benchmarks of grpo_kernels against its peers (TRL, Liger-Kernel, torch.compile).

One set of case and implementation definitions (:mod:`benchmarks.cases`,
:mod:`benchmarks.implementations`) serves both the pytest-benchmark suite
(``pytest benchmarks/``, ``make bench``) and the runner
(``python -m benchmarks.run``), which also measures the device's limits and
writes the result files under ``benchmarks/results/``.
"""
