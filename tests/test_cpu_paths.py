"""The CPU module is built twice (portable, and AVX2/F16C) and the running CPU's best path is
loaded at import: every path this machine can run gives the same bits on the same steps."""
from __future__ import annotations

import math

import pytest
import torch

import fused_opt
from fused_opt.backends import native_backend
from harness import Config, build, make_grads, run_step

PATHS = [p for p in ("portable", "avx2") if p in native_backend.CPU_MODULES and native_backend._cpu_supports(p)]

CONFIGS = {
    "fp16 momentum clip l2": Config(dtype=torch.float16, max_grad_norm=0.05, inject={4: "inf"}),
    "bf16 nesterov clip inf": Config(dtype=torch.bfloat16, norm_type=math.inf, max_grad_norm=0.05,
                                     groups=[dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2,
                                                  nesterov=True, maximize=True)]),
    # the AVX2 norm pass loads FP16, BF16 and FP32 grads alike and finds inf/NaN from its lane sums
    "bf16 clip l2 nan": Config(dtype=torch.bfloat16, max_grad_norm=0.05, inject={2: "nan", 5: "inf"}),
    "fp32 clip l2 inf": Config(dtype=torch.float32, max_grad_norm=0.05, inject={3: "inf"}),
    "fp16 clip inf nan": Config(dtype=torch.float16, norm_type=math.inf, max_grad_norm=0.05, inject={1: "nan"}),
    "fp32 dampening no clip": Config(dtype=torch.float32, loss_scale=None,
                                     groups=[dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.0,
                                                  nesterov=False, maximize=False)]),
}


def test_the_loaded_path_is_reported():
    info = fused_opt.build_info()
    assert info["cpu_path"] in info["cpu_paths_built"]
    if len(PATHS) == 2:
        assert info["cpu_path"] == "avx2"  # the fastest supported path is the one loaded


@pytest.mark.skipif(len(PATHS) < 2, reason="this CPU runs only the portable path")
@pytest.mark.parametrize("name", CONFIGS.keys())
def test_every_cpu_path_gives_the_same_bits(name):
    config = CONFIGS[name]
    results = {}
    for path in PATHS:
        previous = native_backend.use_cpu_path(path)
        try:
            params, opt, _ = build(config, "native", "cpu")
            norms = []
            for step in range(config.steps):
                run_step(opt, params, make_grads(config, params, step, float(opt.loss_scale)))
                norms.append(opt.last_grad_norm.clone())
            results[path] = [p.detach().clone() for p in params] + norms + [
                t.clone() for p in params if p in opt.state for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        finally:
            native_backend._native_cpu = previous
    first, *others = results.values()
    for other in others:
        assert len(first) == len(other)
        for a, b in zip(first, other):
            assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != +0.0 and NaN == NaN compare as they should here."""
    t = t.detach().contiguous().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
