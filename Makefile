# One place that knows how to set up and run things; README's quickstart and .ci/run use it.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is a local CPU build here (an unpinned torch pulls GBs); triton 3.7.1 is what
# torch 2.13's CUDA build requires, and on a CPU machine it runs kernels in its interpreter.
DEPS := torch==2.13.0 triton==3.7.1 pytest pytest-xdist pytest-timeout hypothesis expecttest numpy pybind11 setuptools wheel build matplotlib scikit-learn tqdm
# Test-only: the frameworks users train with (never dependencies of fused_opt itself).
FRAMEWORKS := lightning transformers accelerate

.PHONY: setup test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# torch on the same line, so that no framework pulls another torch.
$(VENV)/.frameworks: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0 $(FRAMEWORKS)
	touch $@

test: setup $(VENV)/.frameworks
	$(PY) -m pytest -q -n 2 tests

bench: setup
	$(PY) -m fused_opt.bench
