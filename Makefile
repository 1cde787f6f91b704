# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when needed and install what they use. torch is installed
# only when none is importable, and then exactly torch==$(TORCH_VERSION) (a CPU
# build here): an unpinned torch would pull several GB of CUDA packages.
PYTHON        ?= python3
VENV          ?= .venv
VPY           := $(VENV)/bin/python
PIP           := $(VPY) -m pip --quiet
TORCH_VERSION ?= 2.13.0
DEV_PACKAGES  := triton numpy pybind11 ninja pytest pytest-benchmark hypothesis matplotlib
# Peers, for parity tests only (never imported by the library).
PEER_PACKAGES := trl==1.16.0
# verl's loss module and what it imports, installed without dependencies (verl's own list would pull a
# CUDA torch and more); tests/test_integration_verl.py compares with verl itself when it imports.
VERL_PACKAGES := verl==0.9.1 ray==2.60.0 tensordict==0.10.0 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 \
	codetiming==1.4.0 orjson==3.13.0 msgpack==1.2.4 protobuf==7.36.2 requests==2.34.2 urllib3==2.8.0 \
	charset_normalizer==3.5.2 certifi==2026.10.18 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
	referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 pyvers==0.2.3 cloudpickle==3.1.2
STAMP         := $(VENV)/.grpo-kernels-installed
CONSTRAINTS   := $(VENV)/torch-constraint.txt

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	# Pin whatever torch is now installed, so no later step can replace it.
	$(VPY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) $(DEV_PACKAGES)
	$(PIP) install -c $(CONSTRAINTS) $(PEER_PACKAGES)
	$(PIP) install -c $(CONSTRAINTS) --no-deps $(VERL_PACKAGES)
	$(PIP) install -c $(CONSTRAINTS) --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(VPY) examples/r1_zero_toy.py

test: $(STAMP)
	$(VPY) -m pytest tests

# The pytest-benchmark suite (benchmarks/test_suite.py); not part of `make test`.
bench: $(STAMP)
	$(VPY) -m pytest benchmarks

clean:
	rm -rf build *.egg-info grpo_kernels/_C*.so .pytest_cache .hypothesis examples/output
