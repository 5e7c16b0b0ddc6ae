"""The loss scale's hysteresis, bounds and skip counter (loss_scaler.py) against float64
transcriptions of Megatron-core's and DeepSpeed's rules over long inf/NaN patterns, on every
backend; their checks and state."""
import copy
import random

import pytest
import torch

import fused_opt
from fused_opt.loss_scaler import LossScaler
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, Config, run_against_reference


def group(**kw):
    return {**dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False), **kw}


def pattern(seed: int, steps: int, rate: float) -> dict:
    rng = random.Random(seed)
    return {k: rng.choice(["inf", "nan"]) for k in range(steps) if rng.random() < rate}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("hysteresis,min_scale,max_scale,rate,seed,mode", [
    (2, 2.0**6, 2.0**13, 0.35, 0, "megatron"),     # bursts of overflows, the floor and the cap both reached
    (3, None, 2.0**11, 0.5, 1, "megatron"),
    (1, 2.0**8, None, 0.6, 2, "megatron"),         # GradScaler's rule with a floor
    (4, 2.0**4, 2.0**12, 0.25, 3, "megatron"),
    (2, None, None, 0.4, 4, "consecutive"),
    (3, 2.0**6, 2.0**12, 0.5, 5, "consecutive"),
], ids=["h2-floor-cap", "h3-cap", "h1-floor", "h4-both", "h2-consecutive", "h3-consecutive-both"])
def test_long_inf_patterns_match_the_reference(backend, device, hysteresis, min_scale, max_scale, rate, seed, mode):
    steps = 60
    config = Config(groups=[group()], sizes=(7, 33), steps=steps, growth_interval=2, init_scale=2.0**10,
                    hysteresis=hysteresis, min_scale=min_scale, max_scale=max_scale, hysteresis_mode=mode,
                    inject=pattern(seed, steps, rate))
    opt, _ = run_against_reference(config, backend, device)  # scale, counters and skips checked every step
    scale = float(opt.loss_scale)
    assert (min_scale or 0) <= scale <= (max_scale or float("inf"))


def test_defaults_are_gradscalers_rule():
    opt = fused_opt.FusedMixedPrecisionSGD([torch.nn.Parameter(torch.zeros(3).half())], lr=0.1)
    assert opt._scaler.hysteresis == 1 and opt._scaler.max_scale == float("inf") and not opt._scaler.consecutive
    assert opt._scaler.min_scale == 2.0**-126  # the lowest scale whose reciprocal stays finite


@pytest.mark.parametrize("kwargs,match", [
    (dict(hysteresis=0), "hysteresis must be a positive"),
    (dict(hysteresis=1.5), "hysteresis must be a positive"),
    (dict(min_scale=-1.0), "min_scale must be None or a finite number"),
    (dict(max_scale=float("inf")), "max_scale must be None or a finite number"),
    (dict(min_scale=1e-39), "min_scale must be None or a finite number"),
    (dict(hysteresis_mode="deepspeed"), "hysteresis_mode must be"),
    (dict(backoff_factor=1.0), r"backoff_factor must be in \(0, 1\)"),
    (dict(backoff_factor=2.0), r"backoff_factor must be in \(0, 1\)"),
    (dict(growth_factor=1.0), "growth_factor must be a finite number > 1"),
    (dict(growth_factor=0.5), "growth_factor must be a finite number > 1"),
    (dict(init_scale=1e-39), "init_scale must be a finite number in"),
    (dict(init_scale=2.0**128), "init_scale must be a finite number in"),
    (dict(loss_scale=1e-39), "loss_scale must be a finite number in"),
    (dict(loss_scale=float("nan")), "loss_scale must be a finite number in"),
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


# -- Megatron-core's and DeepSpeed's rules, transcribed in float64 as their authors wrote them --

FP32_MAX = float(torch.finfo(torch.float32).max)


class MegatronScaler:
    """megatron.core.optimizer.grad_scaler.DynamicGradScaler.update. One deviation, ours and
    GradScaler's: the scale grows only to a finite FP32 value (Megatron's FP32 tensor would
    become inf after ~112 growths from 2^16)."""

    def __init__(self, scale, growth, backoff, interval, hysteresis, min_scale):
        self.scale, self.growth, self.backoff, self.interval = scale, growth, backoff, interval
        self.hysteresis, self.min_scale = hysteresis, min_scale
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, found_inf):
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                if self.scale * self.growth <= FP32_MAX:
                    self.scale = self.scale * self.growth


class DeepSpeedScaler:
    """deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler.update_scale (the scale is
    divided by scale_factor on a backoff: backoff_factor = 1/growth_factor), with the same
    finite-growth deviation as MegatronScaler."""

    def __init__(self, scale, factor, window, delayed_shift, min_scale, consecutive):
        self.cur_scale, self.scale_factor, self.scale_window = scale, factor, window
        self.delayed_shift = self.cur_hysteresis = delayed_shift
        self.min_scale, self.consecutive_hysteresis = min_scale, consecutive
        self.cur_iter, self.last_overflow_iter = 0, -1

    def update(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                if self.cur_scale * self.scale_factor <= FP32_MAX:
                    self.cur_scale *= self.scale_factor
        self.cur_iter += 1


def _scaler(hysteresis, interval, mode="megatron", min_scale=1.0):
    return LossScaler("dynamic", 2.0**16, 2.0, 0.5, interval, torch.device("cpu"), hysteresis, min_scale, None, mode)


def _overflow_patterns(count, steps):
    """Random overflow patterns: sparse, dense, and bursts (runs of overflows and of clean steps)."""
    rng = random.Random(1234)
    for k in range(count):
        kind = k % 3
        if kind == 2:
            flags, overflow = [], False
            while len(flags) < steps:
                flags += [overflow] * rng.randint(1, 12)
                overflow = not overflow
            yield flags[:steps]
        else:
            rate = 0.05 if kind == 0 else 0.5
            yield [rng.random() < rate for _ in range(steps)]


@pytest.mark.parametrize("hysteresis", [1, 2, 3, 5])
@pytest.mark.parametrize("interval", [1, 3, 7])
def test_default_rule_is_megatrons_scale_for_scale(hysteresis, interval):
    # The torch backend's finalize (LossScaler.update_) here; the kernels' finalize is held to
    # the same float64 rule over long patterns by test_long_inf_patterns_match_the_reference.
    for flags in _overflow_patterns(6, 400):
        ours, theirs = _scaler(hysteresis, interval), MegatronScaler(2.0**16, 2.0, 0.5, interval, hysteresis, 1.0)
        for step, overflow in enumerate(flags):
            ours.update_(torch.tensor(overflow))
            theirs.update(overflow)
            assert float(ours.scale) == theirs.scale, f"step {step}"
            assert int(ours.growth_tracker) == theirs.growth_tracker, f"step {step}"
            assert int(ours.hysteresis_tracker) == hysteresis - max(theirs.hysteresis_tracker, 0), f"step {step}"


@pytest.mark.parametrize("hysteresis", [1, 2, 4])
@pytest.mark.parametrize("interval", [2, 5])
@pytest.mark.parametrize("mode", ["megatron", "consecutive"])
def test_hysteresis_modes_are_deepspeeds_rules(hysteresis, interval, mode):
    # DeepSpeed grows on the interval-th clean step after the last overflow, counted by
    # iteration number from -1: the same step as GradScaler's counter, from the start too.
    for flags in _overflow_patterns(6, 400):
        ours = _scaler(hysteresis, interval, mode)
        theirs = DeepSpeedScaler(2.0**16, 2.0, interval, hysteresis, 1.0, mode == "consecutive")
        for step, overflow in enumerate(flags):
            ours.update_(torch.tensor(overflow))
            theirs.update(overflow)
            assert float(ours.scale) == theirs.cur_scale, f"step {step}"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("mode", ["megatron", "consecutive"])
def test_every_backends_finalize_follows_the_rule(backend, device, mode):
    # Only the finalize matters here: one tiny param, 120 steps of a bursty pattern.
    flags = next(_overflow_patterns(3, 120)) + list(_overflow_patterns(3, 120))[2]
    p = torch.nn.Parameter(torch.ones(3, device=device).half())
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.0, backend=backend, hysteresis=3, hysteresis_mode=mode,
                                           growth_interval=4, init_scale=2.0**16, min_scale=1.0)
    oracle = _scaler(3, 4, mode)
    for step, overflow in enumerate(flags):
        p.grad = torch.full_like(p, float("inf") if overflow else 1.0)
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
        oracle.update_(torch.tensor(overflow))
        assert float(opt.loss_scale) == float(oracle.scale), f"step {step}"
        assert int(opt._scaler.hysteresis_tracker) == int(oracle.hysteresis_tracker), f"step {step}"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_loaded_counters_are_bounded(backend, device):
    # A hysteresis counter of 2**31 - 1 (or a growth counter past the interval) from a state
    # dict is clamped into range: the next overflow still backs off, the next clean step grows.
    p = torch.nn.Parameter(torch.ones(3, device=device).half())
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.0, backend=backend, hysteresis=2, growth_interval=10)
    saved = opt.state_dict()

    def load(**counters):
        sd = copy.deepcopy(saved)
        for name, value in counters.items():
            sd["param_groups"][0]["fused_opt"]["loss_scaler"][name] = torch.tensor(value, dtype=torch.int32)
        opt.load_state_dict(sd)

    def step(overflow):
        p.grad = torch.full_like(p, float("inf") if overflow else 1.0)
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
        return float(opt.loss_scale)

    load(growth_tracker=2**31 - 1)
    assert int(opt._scaler.growth_tracker) == 9
    assert step(False) == 2.0**17
    load(hysteresis_tracker=2**31 - 1)
    assert int(opt._scaler.hysteresis_tracker) == 2
    assert step(True) == 2.0**15
    # Counters written into the live tensors (not through a load) are clamped by the kernels.
    opt._scaler.hysteresis_tracker.fill_(2**31 - 1)
    assert step(True) == 2.0**14 and int(opt._scaler.hysteresis_tracker) == 2
    opt._scaler.growth_tracker.fill_(2**31 - 1)
    assert step(False) == 2.0**15 and int(opt._scaler.growth_tracker) == 0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_the_scale_never_backs_off_below_a_usable_reciprocal(backend, device):
    p = torch.nn.Parameter(torch.ones(3, device=device).half())
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.0, backend=backend, init_scale=2.0**-120, backoff_factor=2.0**-4)
    for _ in range(3):
        p.grad = torch.full_like(p, float("nan"))
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
    assert float(opt.loss_scale) == 2.0**-126
    p.grad = torch.zeros_like(p)  # (a grad of 1 at S = 2^-126 unscales to 2^126: its square overflows)
    opt.scale_loss(torch.zeros((), device=device))
    opt.step()
    assert not bool(opt.last_step_skipped)  # 1/S is finite: a clean grad is not turned into NaN


def test_a_loaded_scale_must_have_a_finite_reciprocal():
    p = torch.nn.Parameter(torch.ones(3).half())
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"][0]["fused_opt"]["loss_scaler"]["scale"] = torch.tensor(1e-39)
    with pytest.raises(ValueError, match="reciprocal"):
        opt.load_state_dict(sd)
    assert float(opt.loss_scale) == 2.0**16
