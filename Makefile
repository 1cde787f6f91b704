# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when needed and install what they use. torch is installed
# only when none is importable, and then exactly torch==$(TORCH_VERSION) (a CPU
# build here): an unpinned torch would pull several GB of CUDA packages.
PYTHON        ?= python3
VENV          ?= .venv
VPY           := $(VENV)/bin/python
PIP           := $(VPY) -m pip --quiet
TORCH_VERSION ?= 2.13.0
DEV_PACKAGES  := triton numpy pybind11 ninja build pytest pytest-benchmark hypothesis matplotlib
# Peers, for parity tests only (never imported by the library).
PEER_PACKAGES := trl==1.16.0 liger-kernel==0.8.5
# verl's loss module and what it imports, installed without dependencies (verl's own list would pull a
# CUDA torch and more); tests/test_integration_verl.py compares with verl itself when it imports.
VERL_PACKAGES := verl==0.9.1 ray==2.60.0 tensordict==0.10.0 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 \
	codetiming==1.4.0 orjson==3.13.0 msgpack==1.2.4 protobuf==7.36.2 requests==2.34.2 urllib3==2.8.0 \
	charset_normalizer==3.5.2 certifi==2026.10.18 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
	referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 pyvers==0.2.3 cloudpickle==3.1.2
# OpenRLHF, without dependencies: tests/test_integration_openrlhf.py loads its loss module, which needs only torch.
OPENRLHF_PACKAGES := openrlhf==0.11.2
STAMP         := $(VENV)/.grpo-kernels-installed
CONSTRAINTS   := $(VENV)/torch-constraint.txt

# The default build carries the cpu backend's kernels twice, for x86-64-v3 (AVX2 + FMA, the baseline)
# and x86-64-v4 (AVX-512), and runs the most capable copy the CPU supports. test-baseline-cpu repeats the
# cpu-backend tests on the baseline copy (GRPO_KERNELS_CPU_ISA; test_cpu_backend.py checks that it ran),
# so both vector code paths are tested on an AVX-512 machine, from the one build.
BASELINE_ISA  ?= avx2
BASELINE_TESTS := tests/test_cpu_backend.py tests/test_token_logprobs.py tests/test_fused_grpo_loss.py \
	tests/test_grpo_loss.py tests/test_group_advantages.py tests/test_linear_token_logprobs.py \
	tests/test_fused_linear_grpo_loss.py tests/test_packed.py

.PHONY: setup demo test test-baseline-cpu test-package bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	# Pin whatever torch is now installed, so no later step can replace it.
	$(VPY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) $(DEV_PACKAGES)
	$(PIP) install -c $(CONSTRAINTS) $(PEER_PACKAGES)
	$(PIP) install -c $(CONSTRAINTS) --no-deps $(VERL_PACKAGES) $(OPENRLHF_PACKAGES)
	$(PIP) install -c $(CONSTRAINTS) --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(VPY) examples/r1_zero_toy.py

test: $(STAMP)
	$(VPY) -m pytest tests
	$(MAKE) test-baseline-cpu test-package

# (nothing to repeat where the CPU has no AVX-512: the tests above ran the baseline copy; the thread-count
# test compared that copy's bits with the dispatched one's there)
test-baseline-cpu: $(STAMP)
	@if [ "$$($(VPY) -c 'import grpo_kernels as gk; print(gk.extension_info().get("cpu_isa"))')" = $(BASELINE_ISA) ]; \
	then echo "test-baseline-cpu: the tests already ran the $(BASELINE_ISA) copy of the cpu kernels"; \
	else GRPO_KERNELS_CPU_ISA=$(BASELINE_ISA) $(VPY) -m pytest -p no:cacheprovider -q $(BASELINE_TESTS) \
		-k "cpu and not thread_count"; fi

# The sdist as a user installs it (README "Install"): a fresh venv with only torch==$(TORCH_VERSION) and the
# build tools; the sdist built into a wheel against that torch (pip --no-build-isolation: never a second
# torch) with the default targets (the x86-64-v3 baseline and the AVX-512 copy: a wheel for other
# machines), the wheel checked for the extension and installed; then, outside the source tree, the
# package must import from the venv with its extension (past the guard of _extension.py) and pass the
# check of the extension's four kernel ops.
PACKAGE_DIR   := build/package
PACKAGE_CHECK := --devices cpu --no-timing --ops token_logprobs,group_advantages,grpo_loss,fused_grpo_loss --budget 60
test-package: $(STAMP)
	rm -rf $(PACKAGE_DIR) && mkdir -p $(PACKAGE_DIR)
	$(VPY) -m build --sdist --no-isolation --outdir $(PACKAGE_DIR)/dist . > $(PACKAGE_DIR)/sdist.log 2>&1 \
		|| (tail -n 40 $(PACKAGE_DIR)/sdist.log; exit 1)
	$(PYTHON) -m venv $(PACKAGE_DIR)/venv
	$(PACKAGE_DIR)/venv/bin/python -m pip --quiet install "torch==$(TORCH_VERSION)" "setuptools>=77" ninja
	cd $(PACKAGE_DIR) && env -u GRPO_KERNELS_CPU_ARCH PATH=$(CURDIR)/$(PACKAGE_DIR)/venv/bin:$$PATH MAX_JOBS=2 \
		venv/bin/python -m pip wheel --no-cache-dir \
		--no-build-isolation --no-deps --wheel-dir dist dist/grpo_kernels-*.tar.gz > wheel.log 2>&1 \
		|| (tail -n 40 wheel.log; exit 1)
	cd $(PACKAGE_DIR) && venv/bin/python -m zipfile -l dist/grpo_kernels-*.whl > wheel.txt \
		&& grep -q 'grpo_kernels/_C\..*\.so' wheel.txt && grep -q 'grpo_kernels/_C_build\.json' wheel.txt
	cd $(PACKAGE_DIR) && venv/bin/python -m pip --quiet install dist/grpo_kernels-*.whl
	cd $(PACKAGE_DIR) && venv/bin/python -c "import grpo_kernels as gk, platform; info = gk.extension_info(); \
		assert '/venv/' in gk.__file__ and gk.extension_available(), (gk.__file__, info); \
		assert platform.machine() != 'x86_64' or info['cpu_arch'] == 'x86-64-v3+x86-64-v4', info; print(info)"
	cd $(PACKAGE_DIR) && GRPO_KERNELS_CACHE_DIR=$(CURDIR)/$(PACKAGE_DIR)/cache venv/bin/python -m grpo_kernels.check $(PACKAGE_CHECK)

# The pytest-benchmark suite (benchmarks/test_suite.py); not part of `make test`.
bench: $(STAMP)
	$(VPY) -m pytest benchmarks

clean:
	rm -rf build *.egg-info grpo_kernels/_C*.so .pytest_cache .hypothesis examples/output
