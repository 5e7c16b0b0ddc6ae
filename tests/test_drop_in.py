"""What a user swapping torch.optim.SGD for ours relies on: the safety checks of a drop-in,
schedulers, tensor lr, determinism, empty steps and backend choice."""
import math

import pytest
import torch

import fused_opt
from fused_opt.backends import BACKENDS
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, Config, build, make_grads, run_step

SGD = fused_opt.FusedMixedPrecisionSGD


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("loss_scale", ["dynamic", 128.0])
def test_step_without_scale_loss_raises_before_any_write(loss_scale, backend, device):
    model = torch.nn.Linear(4, 2).to(device=device, dtype=torch.bfloat16)
    opt = SGD(model.parameters(), lr=0.1, loss_scale=loss_scale, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(3, 4, device=device, dtype=torch.bfloat16)).float().sum().backward()
    with pytest.raises(RuntimeError, match="scale_loss"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state  # no master was even created


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_param_changed_outside_is_not_reverted(backend, device):
    model = torch.nn.Linear(8, 4).to(device=device, dtype=torch.float16)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, loss_scale=None, backend=backend)
    for _ in range(2):
        model(torch.ones(2, 8, device=device, dtype=torch.float16)).float().sum().backward()
        opt.step()
        opt.zero_grad()
    fresh = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.load_state_dict(fresh)               # a copy_ into the params: _version changes
    with torch.no_grad():
        torch.nn.init.constant_(model.bias, 0.25)
    model(torch.ones(2, 8, device=device, dtype=torch.float16)).float().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    buffers = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        start = 0.25 if name == "bias" else 0.5
        expected = start - 0.1 * buffers[name]
        torch.testing.assert_close(opt.state[p]["master_param"], expected, rtol=1e-6, atol=1e-6)
        assert grads[name].abs().sum() > 0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_two_identical_runs_are_bit_identical(backend, device):
    config = Config(max_grad_norm=0.05, inject={3: "inf"}, steps=8)
    results = []
    for _ in range(2):
        params, opt, _ = build(config, backend, device)
        norms = []
        for step in range(config.steps):
            run_step(opt, params, make_grads(config, params, step, float(opt.loss_scale)))
            norms.append(opt.last_grad_norm.clone())
        results.append(([p.detach().clone() for p in params], norms,
                        [v.clone() for p in params for v in opt.state.get(p, {}).values()]))
    (p1, n1, s1), (p2, n2, s2) = results
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert all(torch.equal(a, b) or (a.isnan() and b.isnan()) for a, b in zip(n1, n2))
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_step_without_grads_changes_nothing(backend, device):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16, device=device))
    opt = SGD([p], lr=0.1, growth_interval=1, backend=backend)
    opt.step()
    assert float(opt.last_grad_norm) == 0.0 and not bool(opt.last_step_skipped)
    assert float(opt.loss_scale) == 2.0**16 and int(opt._scaler.growth_tracker) == 0
    assert not opt.state and torch.equal(p.detach(), torch.ones(3, dtype=torch.float16, device=device))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_tensor_lr_equals_float_lr(backend, device):
    runs = []
    for lr in (0.05, torch.tensor(0.05, device=device)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 9, device=device).half())
        opt = SGD([p], lr=lr, momentum=0.9, loss_scale=None, backend=backend)
        for step in range(3):
            p.grad = torch.full_like(p, 0.1 * (step + 1))
            opt.step()
        runs.append(opt.state[p]["master_param"].clone())
    assert torch.equal(runs[0], runs[1])


def scheduler_run(make_opt, make_sched, device, steps=12):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 5, device=device))
    opt = make_opt([p])
    sched = make_sched(opt)
    trace = []
    for step in range(steps):
        p.grad = torch.full_like(p, 0.01 * (step % 4 + 1))
        opt.step()
        sched.step()
        trace.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
    return p.detach().clone(), trace


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=12,
                                                                  cycle_momentum=True),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.3, step_size_up=3,
                                                              cycle_momentum=True),
}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("name", SCHEDULERS.keys())
def test_lr_schedulers_match_torch_sgd(name, backend, device):
    ours, our_trace = scheduler_run(lambda ps: SGD(ps, lr=0.1, momentum=0.9, loss_scale=None, backend=backend),
                                    SCHEDULERS[name], device)
    theirs, their_trace = scheduler_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                        SCHEDULERS[name], device)
    assert our_trace == their_trace
    assert len({m for _, m in our_trace}) > 1 or name == "StepLR"  # momentum really cycled
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_backend_availability_and_choice():
    available = fused_opt.backend_availability("cpu")
    assert set(available) == set(BACKENDS) and available["torch"] is None
    opt = SGD([torch.nn.Parameter(torch.ones(2))], backend="auto")
    assert opt.backend == next(name for name in BACKENDS if available[name] is None)
    for name, reason in available.items():
        if reason is not None:
            assert isinstance(reason, str) and reason
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
                SGD([torch.nn.Parameter(torch.ones(2))], backend=name)
    if not torch.cuda.is_available():
        reasons = fused_opt.backend_availability("cuda")
        assert reasons["torch"] is None  # torch runs wherever torch does (here: it would fail later)
    info = fused_opt.build_info()
    assert info["version"] == fused_opt.__version__
    assert {"native_cpu", "native_cuda", "cuda_version", "cuda_archs"} <= set(info)


def test_scale_loss_multiplies_by_the_current_scale():
    opt = SGD([torch.nn.Parameter(torch.ones(2, dtype=torch.float16))], init_scale=8.0)
    loss = torch.tensor(1.5, requires_grad=True)
    assert float(opt.scale_loss(loss).detach()) == 12.0
    assert opt.scale_loss(loss).requires_grad
    none = SGD([torch.nn.Parameter(torch.ones(2))], loss_scale=None)
    assert none.scale_loss(loss) is loss and float(none.loss_scale) == 1.0
    assert math.isfinite(float(opt.loss_scale))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_zero_lr_step_without_scale_loss_raises_once_state_exists(backend, device):
    # A step with every lr 0 and no scale_loss is let through only while the state is empty
    # (torch.distributed.checkpoint's state-initialising step); after that it is a user's bug.
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16, device=device))
    opt = SGD([p], lr=0.0, momentum=0.9, backend=backend)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert float(opt.loss_scale) == 2.0**16 and int(opt._scaler.growth_tracker) == 0
    assert "momentum_buffer" in opt.state_dict()["state"][0]  # as torch.optim.SGD's would have
    with pytest.raises(RuntimeError, match="scale_loss"):
        opt.step()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
@pytest.mark.parametrize("built_as", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_scale_decides_again_when_the_model_turns_fp16(backend, device, flat, built_as):
    # loss_scale="auto" on FP32/BF16 params: no scale. model.half() afterwards: FP16 grads
    # of an unscaled loss would flush; the next step turns the dynamic scale on and raises
    # (nothing stepped), and training goes on with the scale.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(device, built_as)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, backend=backend, flat_grads=flat,
                                           init_scale=2.0**8)
    assert not opt._scaler.enabled
    x = torch.ones(2, 4, device=device)
    for _ in range(2):
        opt.zero_grad()
        opt.scale_loss(model(x.to(built_as)).float().sum()).backward()
        opt.step()
    model.half()
    opt.zero_grad()
    opt.scale_loss(model(x.half()).float().sum()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="the params are FP16 now"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt._scaler.enabled and opt._scaler.dynamic and float(opt.loss_scale) == 2.0**8
    opt.zero_grad()
    opt.scale_loss(model(x.half()).float().sum()).backward()
    opt.step()
    assert not bool(opt.last_step_skipped)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
