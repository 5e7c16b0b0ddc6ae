# One place that knows how to set up and run things; README's quickstart and .ci/run use it.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is a local CPU build here (an unpinned torch pulls GBs); triton 3.7.1 is what
# torch 2.13's CUDA build requires, and on a CPU machine it runs kernels in its interpreter.
DEPS := torch==2.13.0 triton==3.7.1 pytest pytest-xdist pytest-timeout hypothesis expecttest numpy pybind11 setuptools wheel build matplotlib scikit-learn tqdm
# Test-only: the frameworks users train with (never dependencies of fused_opt itself).
FRAMEWORKS := lightning transformers accelerate
# torchtitan is installed without its own pins (it asks for datasets<4.8, whose huggingface-hub
# is older than transformers needs); its trainer (tests/torchtitan_cpu_trainer.py) runs with
# these of its dependencies (not wandb), on the same line as the frameworks so they agree.
TORCHTITAN := torchtitan==0.3.0
TORCHTITAN_DEPS := tyro spmd_types==0.2.3 tensorboard torchdata datasets
# The other libraries' optimizers the benchmark and bench.quality compare with (fused_opt/bench/peers.py):
# those that install beside torch 2.13 (FlashOptim installs, and runs only on CUDA).
PEERS := torchao==0.18.0 bitsandbytes==0.50.2 torch-optimi==0.3.3 heavyball==3.2.1 flashoptim==0.1.4

.PHONY: setup test asan bench bench-full peer-wheels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# torch on the same line, so that no framework pulls another torch.
$(VENV)/.frameworks: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0 $(FRAMEWORKS) $(TORCHTITAN_DEPS)
	$(PY) -m pip install -q --no-deps $(TORCHTITAN)
	touch $@

$(VENV)/.peers: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1 $(PEERS)
	touch $@

# Wheels of the peers for a GPU machine without network access (bench/run_on_gpu.sh installs them).
peer-wheels: setup
	$(PY) -m pip download -q --no-deps -d build/peer-wheels $(PEERS) opt-einsum

test: setup $(VENV)/.frameworks $(VENV)/.peers
	$(PY) -m pytest -q -n 2 tests
	$(MAKE) asan

# The memory-safety tests against the native CPU modules built with AddressSanitizer: a
# use-after-free or a write outside a tensor aborts with a report instead of passing by luck.
# The package is copied beside the instrumented modules (build/asan) and imported from there;
# libasan (and libstdc++, which it must come before) is preloaded into the uninstrumented Python.
ASAN_TESTS := tests/test_moved_storage.py tests/test_safety.py tests/test_remainder.py tests/test_flat_grads.py tests/test_adamw.py \
	tests/test_ema.py tests/test_compressed.py tests/test_int8_bounds.py tests/test_trust.py tests/test_muon.py tests/test_tensor_watch.py \
	tests/test_multi_tensor.py
asan: setup
	rm -rf build/asan build/asan-temp && mkdir -p build/asan
	tar --exclude='*.so' --exclude=__pycache__ -cf - fused_opt | tar -xf - -C build/asan
	CPPFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" LDFLAGS="-fsanitize=address" FUSED_OPT_NO_CUDA=1 \
		$(PY) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-temp
	cd build/asan && export LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 PYTHONPATH=. && \
		../../$(PY) -c 'import fused_opt.backends.native_backend as n; assert "build/asan" in n._native_cpu.__file__, n._native_cpu.__file__' && \
		../../$(VENV)/bin/pytest -q -p no:cacheprovider -k "native" $(addprefix ../../,$(ASAN_TESTS))

bench: setup $(VENV)/.peers
	$(PY) -m fused_opt.bench

# Every size of the sweep and every mode (tens of minutes on a 2-core CPU).
bench-full: setup $(VENV)/.peers
	$(PY) -m fused_opt.bench --full
