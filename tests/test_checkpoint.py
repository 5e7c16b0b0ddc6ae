"""Checkpoints through torch.distributed.checkpoint (DCP): get/set_optimizer_state_dict keep only
"state" and "param_groups", so the loss scaler's state rides in the param groups; a resume
through dcp.save/dcp.load into a fresh model and optimizer continues bit-identically, and the
FP32 masters survive whichever order the model and the optimizer are loaded in."""
import copy
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES

INF_STEP = 1


def make(seed, dtype, device, backend, optimizer="sgd"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device, dtype)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if optimizer == "adamw":
        opt = fused_opt.FusedMixedPrecisionAdamW(
            [dict(params=weights, weight_decay=1e-2), dict(params=biases, amsgrad=True)], lr=1e-2,
            max_grad_norm=0.5, init_scale=2.0**8, growth_interval=3, loss_scale="dynamic", backend=backend)
        return model, opt
    opt = fused_opt.FusedMixedPrecisionSGD(
        [dict(params=weights, weight_decay=1e-2), dict(params=biases, dampening=0.1)], lr=0.1, momentum=0.9,
        max_grad_norm=0.5, init_scale=2.0**8, growth_interval=3, loss_scale="dynamic", backend=backend)
    return model, opt


def train(model, opt, steps, dtype, device):
    for step in steps:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(device, dtype)
        opt.zero_grad()
        opt.scale_loss(model(x).float().square().mean()).backward()
        if step == INF_STEP:  # a new grad tensor: an in-place edit of a scaled grad would raise (grad_guard.py)
            p = next(model.parameters())
            p.grad = p.grad.clone()
            p.grad.view(-1)[0] = math.inf
        opt.step()


def assert_same_run(model, opt, model2, opt2):
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        keys = [k for k in ("master_param", "momentum_buffer", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                if k in opt.state[p]]
        assert len(keys) > 1 and keys == [k for k in keys if k in opt2.state[q]]
        for key in keys:
            assert opt2.state[q][key].dtype == torch.float32
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key
    assert torch.equal(opt.loss_scale, opt2.loss_scale)
    assert torch.equal(opt._scaler.growth_tracker, opt2._scaler.growth_tracker)
    assert torch.equal(opt._applied_steps, opt2._applied_steps)


DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_dcp_save_load_resumes_bit_identically(backend, device, dtype, optimizer, tmp_path):
    model, opt = make(0, dtype, device, backend, optimizer)
    train(model, opt, range(0, 4), dtype, device)
    saved_scale = opt.loss_scale.clone()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(tmp_path))
    train(model, opt, range(4, 8), dtype, device)

    model2, opt2 = make(99, dtype, device, backend, optimizer)  # different values: all must come from the checkpoint
    # The template a fresh optimizer gives DCP must name every state tensor, or DCP loads none of it.
    template = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    assert float(opt2.loss_scale) == 2.0**8  # DCP's state-initialising step left the scale alone
    dcp.load(template, checkpoint_id=str(tmp_path))
    set_model_state_dict(model2, template["model"])
    set_optimizer_state_dict(model2, opt2, template["optim"])
    assert torch.equal(opt2.loss_scale, saved_scale) and float(saved_scale) != 2.0**8  # it backed off and grew
    train(model2, opt2, range(4, 8), dtype, device)
    assert_same_run(model, opt, model2, opt2)


def resume_and_compare(backend, device, load):
    """Trains 4 steps, loads a fresh model and optimizer from it with `load`, and checks
    that 4 more steps are bit-identical in both."""
    dtype = torch.float16
    model, opt = make(0, dtype, device, backend)
    train(model, opt, range(0, 4), dtype, device)
    model2, opt2 = make(99, dtype, device, backend)
    load(model, opt, model2, opt2)
    train(model, opt, range(4, 8), dtype, device)
    train(model2, opt2, range(4, 8), dtype, device)
    assert_same_run(model, opt, model2, opt2)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_get_set_optimizer_state_dict_round_trip_in_memory(backend, device):
    def load(model, opt, model2, opt2):
        model2.load_state_dict(model.state_dict())
        set_optimizer_state_dict(model2, opt2, get_optimizer_state_dict(model, opt))
    resume_and_compare(backend, device, load)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_loading_the_model_after_the_optimizer_keeps_fp32_masters(backend, device):
    def load(model, opt, model2, opt2):
        model_sd, opt_sd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        opt2.load_state_dict(opt_sd)
        # This bumps the params' _version, so their masters are re-taken at the next step, but
        # only where a param differs from its master rounded: here nowhere.
        model2.load_state_dict(model_sd)
    resume_and_compare(backend, device, load)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_recast_params_keep_fp32_masters(backend, device):
    dtype = torch.float16
    model, opt = make(0, dtype, device, backend)
    train(model, opt, range(0, 4), dtype, device)
    masters = [opt.state[p]["master_param"].clone() for p in model.parameters()]
    model.float().to(dtype)  # new storage for every param: the optimizer sees them changed
    p = next(model.parameters())
    with torch.no_grad():
        p.view(-1)[0] += 1  # and one element really changed: that one is taken from the param
    train(model, opt, range(4, 5), dtype, device)
    model2, opt2 = make(0, dtype, device, backend)
    train(model2, opt2, range(0, 4), dtype, device)
    with torch.no_grad():
        next(model2.parameters()).view(-1)[0] += 1
    train(model2, opt2, range(4, 5), dtype, device)
    assert_same_run(model, opt, model2, opt2)
    assert not torch.equal(masters[0], opt.state[p]["master_param"])


MODES = {"fp32": {}, "bf16-state": dict(state_precision="bf16"), "int8-state": dict(state_precision="int8"),
         "remainder": dict(master_weights="remainder"),
         "remainder8-int8": dict(master_weights="remainder8", state_precision="int8"), "ema": dict(ema_decay=0.9)}


@pytest.mark.parametrize("mode", MODES.keys())
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_flattened_state_dicts_resume_bit_identically(mode, optimizer, tmp_path):
    """DCP's flattened optimizer state dicts (`flatten_optimizer_state_dict=True`, what
    torchtitan saves) rebuild groups and state from the keys the live optimizer has: the loss
    scale and applied-step count (in the groups), remainder masters and int8 state must all
    come back, through dcp.save/dcp.load, and the run continue bit for bit."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    dtype = torch.bfloat16 if mode.startswith("remainder") else torch.float16

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 40), torch.nn.BatchNorm1d(40), torch.nn.Linear(40, 3))
        model = model.to(dtype)
        kw = dict(MODES[mode], loss_scale="dynamic", init_scale=2.0**8, growth_interval=1)
        if "ema_decay" in kw:
            kw["ema_model"] = model
        cls = fused_opt.FusedMixedPrecisionAdamW if optimizer == "adamw" else fused_opt.FusedMixedPrecisionSGD
        extra = {} if optimizer == "adamw" else dict(momentum=0.9)
        return model, cls(model.parameters(), lr=1e-2, max_grad_norm=1.0, **extra, **kw)

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 40, generator=g).to(dtype) for _ in range(6)]

    def step(model, opt, x):
        opt.zero_grad()
        opt.scale_loss(model(x).float().square().mean()).backward()
        opt.step()

    model, opt = build()
    for x in xs[:3]:
        step(model, opt, x)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)},
             checkpoint_id=str(tmp_path))
    scale, applied = float(opt.loss_scale), int(opt._applied_steps)
    assert scale == 2.0**11 and applied == 3
    resumed, resumed_opt = build()
    target = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt,
                                                                                         options=options)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    set_model_state_dict(resumed, target["model"])
    set_optimizer_state_dict(resumed, resumed_opt, target["optim"], options=options)
    assert float(resumed_opt.loss_scale) == scale and int(resumed_opt._applied_steps) == applied
    for x in xs[3:]:
        step(model, opt, x)
        step(resumed, resumed_opt, x)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    if "ema_decay" in MODES[mode]:
        for (name, a), b in zip(opt.ema_state_dict().items(), resumed_opt.ema_state_dict().values()):
            assert torch.equal(a, b), name
