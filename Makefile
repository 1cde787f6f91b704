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
