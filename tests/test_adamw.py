"""FusedMixedPrecisionAdamW: torch.optim.AdamW's update inside the fused step. The matrix of
configurations through every backend against the float64 reference (tests/reference.py);
torch's own AdamW inputs and error inputs (its OptimizerInfo): FP32 against
torch.optim.AdamW, FP16/BF16 against the reference; each param's own step count across
skipped steps and steps without a grad; state dicts in both directions; and the pipeline's
modes (flat grads, remainder masters, FP32 accumulation, GradScaler) against the per-tensor
step of the same backend."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import fused_opt
from harness import (BACKEND_DEVICE_IDS, BACKEND_DEVICES, CPU_BACKEND_DEVICE_IDS, CPU_BACKEND_DEVICES, Config,
                     check_against_reference, run_against_reference, tiny_model, torch_input_kwargs)
from reference import ReferenceAdamW


def group(**kw):
    base = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False)
    return {**base, **kw}


def adamw(**kw) -> Config:
    return Config(optimizer="adamw", **kw)


CONFIGS = {
    "default": adamw(groups=[group()]),
    "betas-eps": adamw(groups=[group(betas=(0.5, 0.9), eps=1e-3)]),
    "beta1-zero": adamw(groups=[group(betas=(0.0, 0.99))]),
    "no-weight-decay": adamw(groups=[group(weight_decay=0.0)]),
    "amsgrad": adamw(groups=[group(amsgrad=True, weight_decay=0.1)]),
    "maximize": adamw(groups=[group(maximize=True)]),
    "two-groups": adamw(groups=[group(lr=5e-3, amsgrad=True),
                                group(lr=2e-2, betas=(0.8, 0.99), maximize=True, weight_decay=0.0)]),
    "clip-l2": adamw(groups=[group()], max_grad_norm=0.05),
    "clip-inf": adamw(groups=[group(amsgrad=True)], max_grad_norm=0.01, norm_type=math.inf),
    # Skipped steps do not count: each param's t (and its bias correction) stays behind.
    "inf-injected": adamw(groups=[group()], max_grad_norm=0.05, inject={0: "inf", 4: "inf", 5: "nan"}, steps=12),
    "static-scale": adamw(groups=[group()], loss_scale=1000.0, inject={2: "inf"}),
    "no-scale-nan": adamw(groups=[group(amsgrad=True)], loss_scale=None, inject={3: "nan"}),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", CONFIGS.keys())
def test_matches_float64_reference(name, dtype, backend, device):
    config = CONFIGS[name]
    run_against_reference(Config(**{**config.__dict__, "dtype": dtype}), backend, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_each_param_counts_its_own_applied_steps(backend, device):
    """t is the param's own count: a step without its grad, and a skipped step, do not count."""
    a, b = (nn.Parameter(torch.randn(5, device=device)) for _ in range(2))
    opt = fused_opt.FusedMixedPrecisionAdamW([a, b], lr=0.1, backend=backend, loss_scale=None)
    plan = [("ab", False), ("a", False), ("ab", True), ("a", False), ("b", False)]
    for names, overflow in plan:
        for name, p in (("a", a), ("b", b)):
            p.grad = torch.randn_like(p) if name in names else None
        if overflow:
            a.grad[0] = math.inf
        opt.step()
    assert float(opt.state[a]["step"]) == 3 and float(opt.state[b]["step"]) == 2
    assert opt.state[a]["step"].dtype == torch.float32 and opt.state[a]["step"].dim() == 0


# -- torch's own AdamW inputs --------------------------------------------------------------
common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
ADAMW_INFO = next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.AdamW)
ADAMW_INPUTS = ADAMW_INFO.optim_inputs_func(device="cpu")
ADAMW_ERRORS = ADAMW_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("optim_input", ADAMW_INPUTS, ids=[i.desc for i in ADAMW_INPUTS])
def test_torch_adamw_inputs_fp32_match_torch_optim_adamw(backend, device, optim_input):
    ours, theirs = tiny_model(device, torch.float32), tiny_model(device, torch.float32)
    kwargs = torch_input_kwargs(optim_input, device)
    opt = fused_opt.FusedMixedPrecisionAdamW(ours.parameters(), loss_scale=None, backend=backend, **kwargs)
    ref = torch.optim.AdamW(theirs.parameters(), **kwargs)
    x = torch.randn(4, 5, device=device)
    for _ in range(5):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    # The loop feeds each optimizer its own model's grads, so the moments (the state is compared
    # open-loop, against the reference, above) are compared through the params they moved.
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert set(opt.state[a]) - {"master_param"} == set(ref.state[b])
        assert float(opt.state[a]["step"]) == float(ref.state[b]["step"])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("optim_input", ADAMW_INPUTS, ids=[i.desc for i in ADAMW_INPUTS])
def test_torch_adamw_inputs_low_precision_match_the_reference(backend, device, dtype, optim_input):
    model = tiny_model(device, dtype)
    params = list(model.parameters())
    opt = fused_opt.FusedMixedPrecisionAdamW(params, loss_scale=None, backend=backend, **torch_input_kwargs(optim_input, device))
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    ref = ReferenceAdamW(params, [0] * len(params), [group], loss_scale=None)
    x = torch.randn(4, 5, device=device, dtype=dtype)
    for _ in range(4):
        opt.zero_grad()
        model(x).float().square().sum().backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        ref.step(grads)
    check_against_reference(opt, params, ref)


# torch's restrictions of its own implementations (a tensor lr or betas with foreach=True):
# the fused step reads a tensor lr on the device whatever foreach says, and takes no tensor betas.
NOT_OURS = ("capturable=False and foreach=True",)


@pytest.mark.parametrize("error", ADAMW_ERRORS, ids=[str(e.error_regex)[:40] for e in ADAMW_ERRORS])
def test_torch_adamw_error_inputs(error):
    """torch's AdamW error inputs raise here too, with torch's words where they are a rule of
    AdamW's; a duplicate param in a group raises where torch only warns (it would keep two
    masters of one tensor)."""
    inp = error.optimizer_error_input
    if any(text in str(error.error_regex) for text in NOT_OURS) and "betas" not in str(inp.kwargs):
        opt = fused_opt.FusedMixedPrecisionAdamW([nn.Parameter(torch.randn(2))], backend="torch", loss_scale=None,
                                                 **torch_input_kwargs(inp, "cpu"))
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
        return
    params = inp.params if inp.params is not None else [nn.Parameter(torch.randn(1, 1))]
    expected = ValueError if error.error_type is UserWarning else error.error_type
    with pytest.raises(expected) as info:
        fused_opt.FusedMixedPrecisionAdamW(params, backend="torch", loss_scale=None, **torch_input_kwargs(inp, "cpu"))
    if error.error_type is not UserWarning and "betas" not in str(inp.kwargs) or "Invalid beta" in str(error.error_regex):
        assert re.search(error.error_regex, str(info.value))


def test_bad_hyperparameters_raise_before_anything_is_written():
    p = nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    for kwargs in (dict(eps=-1.0), dict(eps=math.nan), dict(betas=(0.9,)), dict(betas=(0.9, 1.0)), dict(lr=-1.0),
                   dict(weight_decay=math.inf)):
        with pytest.raises(ValueError):
            fused_opt.FusedMixedPrecisionAdamW([p], **kwargs)
    opt = fused_opt.FusedMixedPrecisionAdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.param_groups[0]["betas"] = (1.5, 0.999)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


# -- state dicts ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_state_dicts_load_both_ways_with_torch_optim_adamw(backend, device):
    """torch's AdamW state dict continues in ours and ours in torch's: the same trajectory."""
    x = torch.randn(4, 5)
    models = [tiny_model(device, torch.float32) for _ in range(3)]

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()

    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    theirs = torch.optim.AdamW(models[0].parameters(), **kwargs)
    train(models[0], theirs, 3)
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    ours = fused_opt.FusedMixedPrecisionAdamW(models[1].parameters(), loss_scale=None, backend=backend, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    train(models[1], ours, 3)
    back = torch.optim.AdamW(models[2].parameters(), **kwargs)
    back.load_state_dict(theirs.state_dict())
    train(models[2], back, 3)
    for a, b in zip(models[1].parameters(), models[2].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and ours into torch's: the same keys, a torch.optim.AdamW continues from it
    saved = ours.state_dict()
    entry = saved["state"][0]
    assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    again = torch.optim.AdamW(models[2].parameters(), **kwargs)
    models[2].load_state_dict(models[1].state_dict())
    again.load_state_dict(copy.deepcopy(saved))
    train(models[1], ours, 2)
    train(models[2], again, 2)
    for a, b in zip(models[1].parameters(), models[2].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_bad_loaded_step_raises_before_anything_is_loaded():
    p = nn.Parameter(torch.randn(4))
    opt = fused_opt.FusedMixedPrecisionAdamW([p], loss_scale=None)
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    for bad in (-1.0, 2.5, math.nan):
        broken = {**saved, "state": {0: {**saved["state"][0], "step": torch.tensor(bad)}}}
        with pytest.raises(ValueError, match="step"):
            opt.load_state_dict(broken)
    assert float(opt.state[p]["step"]) == 1


# -- the pipeline's modes, through AdamW ---------------------------------------------------
def _run(backend, device, dtype, steps=6, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).to(device=device, dtype=dtype)
    opt = fused_opt.FusedMixedPrecisionAdamW(model.parameters(), lr=1e-2, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(3, 6, generator=gen).to(device=device, dtype=dtype)
        opt.zero_grad()
        loss = model(x).float().square().sum()
        (opt.scale_loss(loss) if opt._scaler.enabled else loss).backward()
        if step == 2:
            next(model.parameters()).grad.view(-1)[0] = math.inf  # a skipped step on the way
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("mode", ["flat_grads", "remainder", "fp32_grad_accumulation", "remainder-flat"])
def test_modes_step_as_the_per_tensor_step(backend, device, mode):
    """Flat storage and FP32 sums step bit for bit as the per-tensor step of the same backend;
    BF16 remainder masters within 1 ulp of FP32 masters (exact up to the documented tie)."""
    dtype = torch.bfloat16
    kwargs = {"flat_grads": dict(flat_grads=True), "remainder": dict(master_weights="remainder"),
              "fp32_grad_accumulation": dict(fp32_grad_accumulation=True),
              "remainder-flat": dict(master_weights="remainder", flat_grads=True)}[mode]
    expected, _ = _run(backend, device, dtype)
    got, opt = _run(backend, device, dtype, **kwargs)
    if mode.startswith("flat"):
        assert opt.flat_grads_status == "active"
    for a, b in zip(got, expected):
        if mode.startswith("remainder"):
            diff = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
            assert int(diff.max()) <= 1
        else:
            assert torch.equal(a, b)
    assert all(float(s["step"]) == 5 for s in opt.state.values())


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_grad_scaler_drives_it_as_torch_optim_adamw(backend, device):
    """torch.amp.GradScaler with loss_scale=None: its scale and found_inf are taken inside the
    step, and an overflow skips it; FP32 params match torch.optim.AdamW under the same scaler."""
    results = []
    for make in (lambda ps: fused_opt.FusedMixedPrecisionAdamW(ps, lr=1e-2, loss_scale=None, backend=backend),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2)):
        model = tiny_model(device, torch.float32)
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=2)
        for step in range(5):
            opt.zero_grad()
            scaler.scale(model(torch.ones(2, 5)).square().sum()).backward()
            if step == 1:
                next(model.parameters()).grad.view(-1)[0] = math.nan
            scaler.step(opt)
            scaler.update()
        results.append(([p.detach().clone() for p in model.parameters()], scaler.get_scale()))
    (ours, our_scale), (theirs, their_scale) = results
    assert our_scale == their_scale
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", CPU_BACKEND_DEVICES, ids=CPU_BACKEND_DEVICE_IDS)
def test_a_tensor_lr_under_a_scheduler_matches_torch_optim_adamw(backend, device):
    """A tensor lr is read on the device each step; the scheduler changes it in place."""
    ours, theirs = tiny_model(device, torch.float32), tiny_model(device, torch.float32)
    opt = fused_opt.FusedMixedPrecisionAdamW(ours.parameters(), lr=torch.tensor(0.02), loss_scale=None,
                                             backend=backend)
    ref = torch.optim.AdamW(theirs.parameters(), lr=torch.tensor(0.02), foreach=False)
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (opt, ref)]
    x = torch.randn(4, 5)
    for _ in range(5):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
        for s in schedulers:
            s.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.02 * 0.7**5)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_adam_state_dict_with_l2_weight_decay_is_refused_not_stepped_as_adamw():
    """torch.optim.Adam's groups carry decoupled_weight_decay=False: loading one would silently
    change the optimizer's math, so it raises, before anything is loaded."""
    ours_model, their_model = tiny_model("cpu", torch.float32), tiny_model("cpu", torch.float32)
    adam = torch.optim.Adam(their_model.parameters(), lr=1e-2, weight_decay=0.1)
    their_model(torch.randn(2, 5)).sum().backward()
    adam.step()
    opt = fused_opt.FusedMixedPrecisionAdamW(ours_model.parameters(), loss_scale=None)
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):
        opt.load_state_dict(adam.state_dict())
    assert not opt.state and opt.param_groups[0]["weight_decay"] == 1e-2
    # without weight decay Adam and AdamW are the same update: that loads
    plain = torch.optim.Adam(their_model.parameters(), lr=1e-2)
    plain.step()
    opt.load_state_dict(plain.state_dict())
    assert float(opt.state[next(ours_model.parameters())]["step"]) == 1
