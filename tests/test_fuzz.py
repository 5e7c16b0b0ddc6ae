"""Hypothesis-driven fuzzing of layouts x dtypes x hyperparameters x inf/NaN against the
float64 reference, on every backend, with params and grads carved from arenas whose other
bytes must not move. Quick in CI; FUSED_OPT_FUZZ_EXAMPLES=2000 for a long run on demand."""
from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("hypothesis")  # a test-only dependency (make test installs it)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, check_against_reference
from reference import ReferenceSGD
from test_safety import Arena

EXAMPLES = int(os.environ.get("FUSED_OPT_FUZZ_EXAMPLES", "12"))

LAYOUTS = ["contiguous", "offset", "permuted", "gaps", "channels_last", "0-dim"]


def layout_of(kind: str, n: int):
    """(shape, strides, extra offset) of a tensor of about n elements laid out as `kind`."""
    if kind == "permuted" and n > 1:
        rows = 3 if n % 3 == 0 else 1
        return (n // rows, rows), (1, n // rows), 0
    if kind == "gaps":
        return (n,), (2,), 0
    if kind == "channels_last":
        shape = (max(1, n // 12), 3, 2, 2)
        return shape, torch.empty(shape, device="meta").to(memory_format=torch.channels_last).stride(), 0
    if kind == "0-dim":
        return (), (), 0
    return (n,), (1,), 1 if kind == "offset" else 0


def carve(arena: Arena, kind: str, n: int, gen) -> torch.Tensor:
    shape, strides, offset = layout_of(kind, n)
    arena.next += offset
    return arena.take(shape, strides=strides, value=torch.randn(shape, generator=gen).to(arena.base.dtype))


def carve_like(arena: Arena, kind: str, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A grad of p's shape in the arena: laid out like p, contiguous, or with gaps."""
    if kind == "gaps" and p.dim() == 1:
        return arena.take(tuple(p.shape), strides=(2,), value=values)
    strides = p.stride() if kind == "like param" else None
    return arena.take(tuple(p.shape), strides=strides, value=values)


groups_st = st.fixed_dictionaries(dict(
    momentum=st.sampled_from([0.0, 0.9]), dampening=st.sampled_from([0.0, 0.5]),
    weight_decay=st.sampled_from([0.0, 1e-2]), nesterov=st.booleans(), maximize=st.booleans(),
    lr=st.sampled_from([0.0, 0.05, 1.0])))


@st.composite
def cases(draw):
    groups = draw(st.lists(groups_st, min_size=1, max_size=2))
    for g in groups:
        if g["nesterov"] and (g["momentum"] == 0 or g["dampening"] != 0):
            g["nesterov"] = False
    steps = draw(st.integers(1, 3))
    return dict(
        dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
        sizes=draw(st.lists(st.sampled_from([0, 1, 6, 7, 33, 1025]), min_size=1, max_size=4)),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4)),
        grad_layouts=draw(st.lists(st.sampled_from(["like param", "contiguous", "gaps"]), min_size=4, max_size=4)),
        groups=groups,
        max_grad_norm=draw(st.sampled_from([None, 0.05, 100.0])),
        norm_type=draw(st.sampled_from([2.0, math.inf])),
        loss_scale=draw(st.sampled_from([None, "dynamic", 128.0])),
        inject=draw(st.lists(st.sampled_from([None, None, "inf", "nan"]), min_size=steps, max_size=steps)),
        no_grad=draw(st.lists(st.booleans(), min_size=4, max_size=4)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_fuzz_against_reference_inside_arenas(backend, device, case):
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    arena, grad_arena = Arena(16384, dtype, device), Arena(16384, dtype, device)
    params = [torch.nn.Parameter(carve(arena, case["layouts"][i], n, gen)) for i, n in enumerate(case["sizes"])]
    group_of = [i % len(case["groups"]) for i in range(len(params))]
    groups = [dict(g, params=[p for i, p in enumerate(params) if group_of[i] == k]) for k, g in enumerate(case["groups"])]
    groups = [g for g in groups if g["params"]]
    group_of = [next(k for k, g in enumerate(groups) if any(q is p for q in g["params"])) for p in params]
    opt = fused_opt.FusedMixedPrecisionSGD(groups, max_grad_norm=case["max_grad_norm"], norm_type=case["norm_type"],
                                           loss_scale=case["loss_scale"], init_scale=2.0**10, growth_interval=2,
                                           backend=backend)
    ref = ReferenceSGD(params, group_of, [{k: v for k, v in g.items() if k != "params"} for g in groups],
                       max_grad_norm=case["max_grad_norm"], norm_type=case["norm_type"],
                       loss_scale=case["loss_scale"], init_scale=2.0**10, growth_interval=2)
    for step, inject in enumerate(case["inject"]):
        scale = float(opt.loss_scale)
        assert scale == ref.scale
        grads = []
        for i, p in enumerate(params):
            if case["no_grad"][i] and i > 0:
                grads.append(None)
                continue
            g_true = torch.randn(p.shape, generator=gen) * 1e-2
            grads.append(carve_like(grad_arena, case["grad_layouts"][i], p, (g_true * scale).to(dtype)))
        if inject and grads[0].numel():
            grads[0][(0,) * grads[0].dim()] = math.inf if inject == "inf" else math.nan
        for p, g in zip(params, grads):
            p.grad = g
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
        norm, skipped = ref.step(grads)
        assert bool(opt.last_step_skipped) == skipped
        if not skipped:
            torch.testing.assert_close(float(opt.last_grad_norm), norm, rtol=1e-5, atol=1e-12)
        check_against_reference(opt, params, ref, f"step {step}")
    assert arena.untouched() and grad_arena.untouched()
