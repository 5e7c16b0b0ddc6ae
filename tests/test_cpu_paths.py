"""The CPU module is built twice (portable, and AVX2/F16C) and the running CPU's best path is
loaded at import: every path this machine can run gives the same bits on the same steps."""
from __future__ import annotations

import math
import os

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
    _assert_same_bits(results)


def _assert_same_bits(results: dict) -> None:
    """results: path -> the tensors a run ended with; every path's must be the same bits."""
    first, *others = results.values()
    for other in others:
        assert len(first) == len(other)
        for a, b in zip(first, other):
            assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != +0.0 and NaN == NaN compare as they should here."""
    t = t.detach().contiguous().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


SIZES = (1, 7, 1023, 1025, 4097)  # the scalar tails of the 8- and 16-wide loops


def _special_values(n: int, dtype, gen) -> torch.Tensor:
    """Random values with ties, subnormals, signed zeros, infinities and NaN mixed in."""
    x = torch.randn(n, generator=gen)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -3e-39, 6e-8, 1 + 2**-8, 65504.0,
                             1e38])
    picks = torch.randint(0, len(specials), (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.2, specials[picks], x).to(dtype)


@pytest.mark.skipif(len(PATHS) < 2, reason="this CPU runs only the portable path")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fp32_grads", [False, True], ids=["own-grads", "fp32-grads"])
def test_avx2_update_gives_the_portable_bits_on_edge_values_and_edits(dtype, fp32_grads):
    # The AVX2 update converts and computes FP16 8 values at a time (sgd_element on __m256,
    # the lane tails on the scalar loop); the portable one per value. Masters holding inf/NaN/subnormals/ties, params edited outside the
    # optimizer between steps (retaken per element), FP16/BF16 grads or FP32 ones
    # (fp32_grad_accumulation sums, read in place): the same bits.
    results = {}
    for path in PATHS:
        previous = native_backend.use_cpu_path(path)
        try:
            gen = torch.Generator().manual_seed(11)
            params = [torch.nn.Parameter(_special_values(n, dtype, gen)) for n in SIZES]
            opt = fused_opt.FusedMixedPrecisionSGD(params, lr=0.5, momentum=0.9, weight_decay=0.01, nesterov=True,
                                                   backend="native", loss_scale=None,
                                                   fp32_grad_accumulation=fp32_grads)
            for step in range(4):
                grads = [torch.randn(p.shape, generator=gen) * 4.0 ** step for p in params]
                if fp32_grads:  # the accumulator's FP32 sums, as backward would leave them
                    sum((p.float() * g).sum() for p, g in zip(params, grads)).backward()
                else:
                    for p, g in zip(params, grads):
                        p.grad = g.to(dtype)
                with torch.no_grad():  # edits outside the optimizer, some to special values
                    for p in params:
                        k = torch.randint(0, p.numel(), (max(1, p.numel() // 10),), generator=gen)
                        p[k] = _special_values(len(k), dtype, gen)
                opt.step()
            results[path] = [p.detach().clone() for p in params] + [
                t.clone() for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        finally:
            native_backend._native_cpu = previous
    _assert_same_bits(results)


def _ties_below(p: torch.Tensor) -> torch.Tensor:
    """FP32 masters halfway between each FP16/BF16 value (even last bit) and its neighbour
    toward zero: round to nearest even gives the value back, rounding ties toward zero the
    odd neighbour."""
    bits = p.view(torch.int16).to(torch.int32) & 0xFFFF
    lower = (bits - 1).to(torch.int16).view(p.dtype)  # magnitude one ulp smaller, same sign
    return ((p.double() + lower.double()) / 2).float()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_write_back_rounds_ties_to_even_as_torch(path, dtype):
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(4097, generator=gen).to(dtype)
    bits = values.view(torch.int16)
    values = torch.where((bits & 1) == 0, bits, bits + 1).view(dtype)  # even last bit: a tie rounds back to it
    values = torch.where(values == 0, torch.ones((), dtype=dtype), values)
    previous = native_backend.use_cpu_path(path)
    try:
        p = torch.nn.Parameter(values.clone())
        opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.0, backend="native", loss_scale=None)
        p.grad = torch.zeros_like(p)
        opt.step()
        masters = _ties_below(values)
        assert torch.equal(masters.to(dtype), values)  # torch's rounding: each tie back to the param
        opt.state[p]["master_param"].copy_(masters)
        opt.step()  # lr 0: the masters stay, and are written back rounded
        assert torch.equal(opt.state[p]["master_param"], masters)
        assert torch.equal(_bits(p), _bits(masters.to(dtype)))
    finally:
        native_backend._native_cpu = previous


def test_the_cpu_kernels_use_as_many_threads_as_torch():
    """torch.set_num_threads bounds the CPU kernels' pool too (torchrun sets OMP_NUM_THREADS=1
    for several ranks per machine; a pool of every core in each rank would oversubscribe), and
    the step's results do not depend on it."""
    before = torch.get_num_threads()
    p = torch.nn.Parameter(torch.randn(1 << 18))
    results = []
    try:
        for threads in (1, before):
            torch.set_num_threads(threads)
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = torch.linspace(-1, 1, q.numel())
            fused_opt.FusedMixedPrecisionSGD([q], lr=0.1, momentum=0.9, backend="native").step()
            assert native_backend._native_cpu.num_threads() == min(threads, os.cpu_count())
            results.append(q.detach().clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
