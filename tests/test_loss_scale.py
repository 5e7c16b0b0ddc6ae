"""The loss scale's hysteresis, bounds and skip counter (loss_scaler.py) against the float64
reference's rules over long inf/NaN patterns, on every backend; their checks and state."""
import copy
import random

import pytest
import torch

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, Config, run_against_reference


def group(**kw):
    return {**dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False), **kw}


def pattern(seed: int, steps: int, rate: float) -> dict:
    rng = random.Random(seed)
    return {k: rng.choice(["inf", "nan"]) for k in range(steps) if rng.random() < rate}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("hysteresis,min_scale,max_scale,rate,seed", [
    (2, 2.0**6, 2.0**13, 0.35, 0),     # bursts of overflows, the floor and the cap both reached
    (3, None, 2.0**11, 0.5, 1),
    (1, 2.0**8, None, 0.6, 2),         # GradScaler's rule with a floor
    (4, 2.0**4, 2.0**12, 0.25, 3),
], ids=["h2-floor-cap", "h3-cap", "h1-floor", "h4-both"])
def test_long_inf_patterns_match_the_reference(backend, device, hysteresis, min_scale, max_scale, rate, seed):
    steps = 60
    config = Config(groups=[group()], sizes=(7, 33), steps=steps, growth_interval=2, init_scale=2.0**10,
                    hysteresis=hysteresis, min_scale=min_scale, max_scale=max_scale,
                    inject=pattern(seed, steps, rate))
    opt, _ = run_against_reference(config, backend, device)  # scale, counters and skips checked every step
    scale = float(opt.loss_scale)
    assert (min_scale or 0) <= scale <= (max_scale or float("inf"))


def test_defaults_are_gradscalers_rule():
    opt = fused_opt.FusedMixedPrecisionSGD([torch.nn.Parameter(torch.zeros(3).half())], lr=0.1)
    assert opt._scaler.hysteresis == 1 and opt._scaler.min_scale == 0.0 and opt._scaler.max_scale == float("inf")


@pytest.mark.parametrize("kwargs,match", [
    (dict(hysteresis=0), "hysteresis must be a positive"),
    (dict(hysteresis=1.5), "hysteresis must be a positive"),
    (dict(min_scale=-1.0), "min_scale must be None or a positive"),
    (dict(max_scale=float("inf")), "max_scale must be None or a positive finite"),
    (dict(min_scale=8.0, max_scale=4.0), "above max_scale"),
    (dict(init_scale=2.0**16, max_scale=2.0**10), "outside"),
])
def test_bad_bounds_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_opt.FusedMixedPrecisionSGD([torch.nn.Parameter(torch.zeros(3).half())], lr=0.1, **kwargs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_consecutive_skips_tell_a_run_that_stopped_learning(backend, device):
    # NaN in the grads every step: the scale falls to its floor and stays there, every step is
    # skipped, and one read of consecutive_skips at a logging interval says so.
    p = torch.nn.Parameter(torch.ones(5, device=device).half())
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, backend=backend, hysteresis=2, min_scale=2.0**10,
                                           init_scale=2.0**14)
    for step in range(12):
        p.grad = torch.full_like(p, float("nan"))
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
    assert int(opt.consecutive_skips) == 12 and float(opt.loss_scale) == 2.0**10
    assert torch.equal(p.detach(), torch.ones_like(p))
    p.grad = torch.ones_like(p)
    opt.scale_loss(torch.zeros((), device=device))
    opt.step()
    assert int(opt.consecutive_skips) == 0


def test_state_dict_carries_the_counters_and_old_ones_load():
    p = torch.nn.Parameter(torch.ones(5).half())
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, hysteresis=3)
    for _ in range(2):
        p.grad = torch.full_like(p, float("inf"))
        opt.scale_loss(torch.zeros(()))
        opt.step()
    sd = opt.state_dict()
    extra = sd["param_groups"][0]["fused_opt"]
    assert int(extra["consecutive_skips"]) == 2 and int(extra["loss_scaler"]["hysteresis_tracker"]) == 2
    twin = fused_opt.FusedMixedPrecisionSGD([torch.nn.Parameter(torch.ones(5).half())], lr=0.1, hysteresis=3)
    twin.load_state_dict(sd)
    assert int(twin.consecutive_skips) == 2 and int(twin._scaler.hysteresis_tracker) == 2
    old = copy.deepcopy(sd)  # as saved before these counters existed
    for group in old["param_groups"]:
        del group["fused_opt"]["consecutive_skips"]
        del group["fused_opt"]["loss_scaler"]["hysteresis_tracker"]
    twin.load_state_dict(old)
    assert int(twin.consecutive_skips) == 0 and int(twin._scaler.hysteresis_tracker) == 0
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["fused_opt"]["consecutive_skips"] = torch.tensor(-1, dtype=torch.int32)
    with pytest.raises(ValueError, match="consecutive_skips"):
        twin.load_state_dict(bad)
