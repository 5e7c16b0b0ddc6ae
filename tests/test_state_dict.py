"""state_dict / load_state_dict: exact resume, torch.optim.SGD dicts, FP32 state kept FP32,
and no trace of skipped steps in the momentum."""
import io
import math

import pytest
import torch

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, Config, build, make_grads, run_step


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


CONFIG = Config(dtype=torch.float16, groups=[dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2,
                                                  nesterov=True, maximize=False),
                                             dict(lr=0.05, momentum=0.5, dampening=0.1, weight_decay=0.0,
                                                  nesterov=False, maximize=False)],
                max_grad_norm=0.05, growth_interval=2, inject={1: "inf", 6: "nan"}, steps=12)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_resume_is_bit_identical(dtype, backend, device):
    config = Config(**{**CONFIG.__dict__, "dtype": dtype})
    params, opt, _ = build(config, backend, device)
    half = 5
    for step in range(half):
        run_step(opt, params, make_grads(config, params, step, float(opt.loss_scale)))
    saved = roundtrip({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]})
    for step in range(half, config.steps):
        run_step(opt, params, make_grads(config, params, step, float(opt.loss_scale)))

    params2, opt2, _ = build(config, backend, device, seed=99)  # different values: all must come from the save
    with torch.no_grad():
        for p, v in zip(params2, saved["params"]):
            p.copy_(v)
    opt2.load_state_dict(saved["opt"])
    for step in range(half, config.steps):
        run_step(opt2, params2, make_grads(config, params2, step, float(opt2.loss_scale)))

    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        for key in ("master_param", "momentum_buffer"):
            if key in opt.state[p]:
                assert opt2.state[q][key].dtype == torch.float32
                assert torch.equal(opt.state[p][key], opt2.state[q][key]), key
    assert torch.equal(opt.loss_scale, opt2.loss_scale)
    assert torch.equal(opt._scaler.growth_tracker, opt2._scaler.growth_tracker)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_loading_keeps_fp32_state_exact_on_fp16_params(backend, device):
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float16, device=device))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, momentum=0.9, loss_scale=None, backend=backend)
    master = torch.tensor([1.0001, 1e-5, 3.14159265, -2.0000001, 7.1234567], device=device)
    buf = torch.tensor([0.1000001, -1e-7, 2.7182818, 5e-6, 1.0], device=device)
    state = {"state": {0: {"master_param": master, "momentum_buffer": buf}},
             "param_groups": opt.state_dict()["param_groups"]}
    opt.load_state_dict(roundtrip(state))
    assert opt.state[p]["master_param"].dtype == torch.float32
    assert torch.equal(opt.state[p]["master_param"], master)
    assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    # and the next step starts from those FP32 values, not from the FP16 param
    p.grad = torch.ones(5, dtype=torch.float16, device=device)
    opt.step()
    expected_buf = 0.9 * buf + 1.0
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected_buf, rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.state[p]["master_param"], master - 0.1 * expected_buf, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_torch_sgd_state_dict_loads_and_continues(dtype, backend, device):
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen) for n in (3, 17)]
    grads = [[torch.randn(n, generator=gen) * 0.1 for n in (3, 17)] for _ in range(8)]
    # torch.optim.SGD on FP32 params for 4 steps, then its state dict moves to ours
    theirs = [torch.nn.Parameter(v.clone().to(device)) for v in init]
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=1e-2)
    for step in range(4):
        for q, g in zip(theirs, grads[step]):
            q.grad = g.to(device)
        sgd.step()
    ours = [torch.nn.Parameter(q.detach().clone().to(dtype)) for q in theirs]
    opt = fused_opt.FusedMixedPrecisionSGD(ours, lr=0.5, loss_scale=None, backend=backend)
    opt.load_state_dict(roundtrip(sgd.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    for step in range(4, 8):
        for p, q, g in zip(ours, theirs, grads[step]):
            p.grad, q.grad = g.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype).float()
        opt.step()
        sgd.step()
    for p, q in zip(ours, theirs):
        if dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:  # masters were taken from the FP16 params, so they start 1 rounding apart
            torch.testing.assert_close(opt.state[p]["master_param"], q.detach(), rtol=2e-3, atol=2e-3)
        # weight decay carries the masters' starting difference into the buffers
        tol = 1e-5 if dtype == torch.float32 else 1e-4
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"],
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_skipped_first_steps_leave_no_trace_in_momentum(backend, device):
    """Steps skipped before the first applied one: the buffer exists on the device but is
    not in state_dict(), and the first applied step still sets b = d."""
    p = torch.nn.Parameter(torch.ones(6, dtype=torch.float16, device=device))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, momentum=0.9, dampening=0.5, init_scale=4.0,
                                           backend=backend)
    for _ in range(3):
        p.grad = torch.full((6,), math.inf, dtype=torch.float16, device=device)
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
        assert bool(opt.last_step_skipped)
    assert "momentum_buffer" in opt.state[p]             # allocated: the skip was decided on the device
    saved = opt.state_dict()["state"]
    assert "momentum_buffer" not in saved.get(0, {})   # but never applied, so not saved
    assert torch.equal(p.detach(), torch.ones(6, dtype=torch.float16, device=device))
    scale = float(opt.loss_scale)
    assert scale == 0.5
    p.grad = torch.full((6,), 2.0 * scale, dtype=torch.float16, device=device)
    opt.scale_loss(torch.zeros((), device=device))
    opt.step()
    # b = d = 2 (not 0.9*b + 0.5*d), w = 1 - 0.1 * 2
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.full((6,), 2.0, device=device))
    assert "momentum_buffer" in opt.state_dict()["state"][0]
    torch.testing.assert_close(opt.state[p]["master_param"], torch.full((6,), 0.8, device=device))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_an_empty_param_keeps_its_applied_momentum_buffer_as_torch(backend, device, precision):
    """An empty param (and FSDP2's empty last shards, where this decides whether every rank's
    state dict has the same keys) has a momentum buffer once a step was applied, as in
    torch.optim.SGD: an empty tensor's memory address is 0, which must not read as "no buffer"."""
    params = [torch.nn.Parameter(torch.ones(5, device=device).half()), torch.nn.Parameter(torch.ones(0, device=device).half())]
    theirs = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    for p, q in zip(params, theirs):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt = fused_opt.FusedMixedPrecisionSGD(params, lr=0.1, momentum=0.9, backend=backend, loss_scale=None,
                                           state_precision=precision)
    torch_opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    opt.step()
    torch_opt.step()
    ours_keys = {i: set(e) & {"momentum_buffer"} for i, e in opt.state_dict()["state"].items()}
    torch_keys = {i: set(e) for i, e in torch_opt.state_dict()["state"].items()}
    assert ours_keys == torch_keys == {0: {"momentum_buffer"}, 1: {"momentum_buffer"}}
