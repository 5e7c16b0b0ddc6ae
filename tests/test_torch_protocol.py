"""The torch.optim protocol as torch's own tests define it: torch's SGD inputs and
error inputs (torch.testing._internal.common_optimizers) through every backend, copies,
named params, the four state-dict hooks, identity round trips, GradScaler's (1,)-shaped
attributes, tensor momenta from schedulers, and torch.optim.SGD's own keywords."""
from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from torch import nn

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES, check_against_reference, tiny_model, torch_input_kwargs
from reference import ReferenceSGD

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
SGD_INFO = next(o for o in common_optimizers.optim_db if o.optim_cls is torch.optim.SGD)
SGD_INPUTS = SGD_INFO.optim_inputs_func(device="cpu")
SGD_ERRORS = SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)



@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("optim_input", SGD_INPUTS, ids=[i.desc for i in SGD_INPUTS])
def test_torch_sgd_inputs_fp32_match_torch_optim_sgd(backend, device, optim_input):
    ours, theirs = tiny_model(device, torch.float32), tiny_model(device, torch.float32)
    kwargs = torch_input_kwargs(optim_input, device)
    opt = fused_opt.FusedMixedPrecisionSGD(ours.parameters(), loss_scale=None, backend=backend, **kwargs)
    ref = torch.optim.SGD(theirs.parameters(), **{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                  for k, v in kwargs.items()})
    x = torch.randn(4, 5, device=device)
    for _ in range(5):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("optim_input", SGD_INPUTS, ids=[i.desc for i in SGD_INPUTS])
def test_torch_sgd_inputs_low_precision_match_the_reference(backend, device, dtype, optim_input):
    kwargs = torch_input_kwargs(optim_input, device)
    model = tiny_model(device, dtype)
    params = list(model.parameters())
    opt = fused_opt.FusedMixedPrecisionSGD(params, loss_scale=None, backend=backend, **kwargs)
    group = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in opt.param_groups[0].items() if k != "params"}
    ref = ReferenceSGD(params, [0] * len(params), [group], loss_scale=None)
    x = torch.randn(4, 5, device=device, dtype=dtype)
    for _ in range(4):
        opt.zero_grad()
        model(x).float().square().sum().backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        ref.step(grads)
    check_against_reference(opt, params, ref)


@pytest.mark.parametrize("error", SGD_ERRORS, ids=[str(e.error_regex)[:40] for e in SGD_ERRORS])
def test_torch_sgd_error_inputs(error):
    """torch's SGD error inputs raise here too; a duplicate param in a group raises where torch
    only warns (a deliberate difference: it would keep two masters of one tensor)."""
    inp = error.optimizer_error_input
    params = inp.params if inp.params is not None else [nn.Parameter(torch.randn(1, 1))]  # as torch's test
    expected = ValueError if error.error_type is UserWarning else error.error_type
    with pytest.raises(expected) as info:
        fused_opt.FusedMixedPrecisionSGD(params, backend="torch", loss_scale=None, **torch_input_kwargs(inp, "cpu"))
    if error.error_type is not UserWarning and "momentum" not in str(error.error_regex) and "1-element" not in str(error.error_regex):
        assert re.search(error.error_regex, str(info.value))


# -- copies ------------------------------------------------------------------------------------

def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen).to(next(model.parameters()))
        opt.zero_grad()
        opt.scale_loss(model(x).float().square().sum() * 100).backward()
        opt.step()


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": lambda obj: torch.load(_saved(obj), weights_only=False),
}


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("how", COPIES.keys())
def test_a_copy_steps_exactly_like_the_original(backend, device, how):
    model = tiny_model(device, torch.float16)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.05, momentum=0.9, max_grad_norm=0.5,
                                           init_scale=2.0**20, growth_interval=2, backend=backend)
    _train(model, opt, 3, seed=0)  # the scale backs off from 2^20 and grows again
    pair = COPIES[how]({"model": model, "opt": opt})
    copy_model, copy_opt = pair["model"], pair["opt"]
    assert copy_opt.backend == opt.backend and copy_opt.max_grad_norm == 0.5
    _train(model, opt, 3, seed=1)
    _train(copy_model, copy_opt, 3, seed=1)
    for a, b in zip(model.parameters(), copy_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["master_param"], copy_opt.state[b]["master_param"])
    assert torch.equal(opt.loss_scale, copy_opt.loss_scale)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_a_copy_mid_fp32_accumulation_continues_it(backend, device):
    model = tiny_model(device, torch.float16)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.05, loss_scale=None,
                                           fp32_grad_accumulation=True, backend=backend)
    x = torch.randn(4, 5, device=device, dtype=torch.float16)
    model(x).float().sum().backward()  # one micro-batch accumulated, one to come
    pair = copy.deepcopy({"model": model, "opt": opt})
    for m, o in ((model, opt), (pair["model"], pair["opt"])):
        m(x * 2).float().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), pair["model"].parameters()):
        assert torch.equal(a, b)


# -- named params, hooks, round trips -------------------------------------------------------------

def test_named_parameters_and_state_dicts_load_across():
    model = tiny_model("cpu", torch.float16)
    named = fused_opt.FusedMixedPrecisionSGD(model.named_parameters(), lr=0.1, momentum=0.9, loss_scale=None)
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    _train(model, named, 2, seed=0)
    unnamed = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, loss_scale=None)
    unnamed.load_state_dict(named.state_dict())
    assert unnamed.param_groups[0]["param_names"] == named.param_groups[0]["param_names"]
    other = fused_opt.FusedMixedPrecisionSGD(tiny_model("cpu", torch.float16).named_parameters(), lr=0.1, loss_scale=None)
    sd = unnamed.state_dict()
    for group in sd["param_groups"]:
        group.pop("param_names")
    other.load_state_dict(sd)
    assert "param_names" in other.param_groups[0]
    with pytest.raises(ValueError, match="with/without names"):
        other.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_the_four_state_dict_hooks_see_and_transform_what_torchs_would():
    p = nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.5, momentum=0.9, loss_scale=None)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state["note"] = 1  # a non-param key, as torch allows
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": seen.append("post") or 42})
    sd = opt.state_dict()
    assert seen == ["pre", "post"] and sd["extra"] == 42 and sd["state"]["note"] == 1
    assert "master_param" in sd["state"][0] and "momentum_buffer" in sd["state"][0]

    received = []

    def pre(o, state_dict):
        received.append(sorted(state_dict["state"][0]))
        changed = copy.deepcopy(state_dict)
        changed["param_groups"][0]["lr"] = 0.25
        return changed

    def post(o):
        received.append(float(o.state[p]["master_param"][0]))
    fresh = fused_opt.FusedMixedPrecisionSGD([p], lr=0.5, momentum=0.9, loss_scale=None)
    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert received[0] == ["master_param", "momentum_buffer"]
    assert received[1] == float(sd["state"][0]["master_param"][0])  # the state was in place
    assert fresh.param_groups[0]["lr"] == 0.25 and fresh.state["note"] == 1


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_state_dict_round_trip_is_the_identity(backend, device):
    model = tiny_model(device, torch.float16)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend)
    _train(model, opt, 2, seed=0)
    first = opt.state_dict()
    opt.load_state_dict(first)
    second = opt.state_dict()
    assert first["param_groups"] == [g for g in second["param_groups"]] or _same(first, second)
    assert _same(first, second)
    assert "differentiable" not in opt.param_groups[0]  # saved for torch's loaders, not taken in


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# -- GradScaler, schedulers, keywords ------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_grad_scaler_attributes_of_shape_one(backend, device, found):
    p = nn.Parameter(torch.ones(4, device=device))
    opt = fused_opt.FusedMixedPrecisionSGD([p], lr=1.0, loss_scale=None, backend=backend)
    opt.grad_scale = torch.full((1,), 4.0, device=device)
    opt.found_inf = torch.full((1,), found, device=device)
    p.grad = torch.full_like(p, 8.0)
    opt.step()
    assert torch.equal(p.detach().cpu(), torch.ones(4) if found else torch.full((4,), -1.0))
    assert bool(opt.last_step_skipped) == bool(found)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR", "set by hand"])
def test_tensor_momenta_match_torch_optim_sgd(backend, device, scheduler):
    ours, theirs = tiny_model(device, torch.float32), tiny_model(device, torch.float32)
    opt = fused_opt.FusedMixedPrecisionSGD(ours.parameters(), lr=0.1, momentum=0.9, dampening=0.1,
                                           loss_scale=None, backend=backend)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    scheds = []
    for o in (opt, ref):
        if scheduler == "OneCycleLR":
            scheds.append(torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=10,
                                                              base_momentum=torch.tensor(0.8),
                                                              max_momentum=torch.tensor(0.95)))
        elif scheduler == "CyclicLR":
            scheds.append(torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2,
                                                            base_momentum=torch.tensor(0.8),
                                                            max_momentum=torch.tensor(0.9)))
        else:
            for g in o.param_groups:
                g["momentum"] = torch.tensor(0.0)  # 0: torch's SGD then ignores dampening
    x = torch.randn(4, 5, device=device)
    for step in range(6):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
        for s in scheds:
            s.step()
        if scheduler != "set by hand":
            assert isinstance(opt.param_groups[0]["momentum"], torch.Tensor)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_sgd_keywords_are_accepted():
    p = nn.Parameter(torch.zeros(2))
    for kwargs in (dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=None), dict(differentiable=False)):
        fused_opt.FusedMixedPrecisionSGD([p], loss_scale=None, **kwargs)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        fused_opt.FusedMixedPrecisionSGD([p], differentiable=True)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_step_hooks_and_the_profiler_see_what_torchs_would(backend, device):
    """Our step skips torch's per-call wrapper when nothing needs it: each kind of step hook
    alone (the optimizer's pre and post, the global pre and post) and all at once must run in
    torch's order with the call's args and kwargs as given, a pre-hook's (args, kwargs) must
    replace them, removed hooks must stop, and a profiler must see the step's record."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def run(make):
        calls = []
        model = tiny_model(device, torch.float32)
        opt = make(model.parameters())
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        closure_calls = []

        def closure():
            closure_calls.append(1)
            return torch.zeros(())
        kinds = {"pre": opt.register_step_pre_hook, "post": opt.register_step_post_hook,
                 "global pre": register_optimizer_step_pre_hook, "global post": register_optimizer_step_post_hook}
        for chosen in [[k] for k in kinds] + [list(kinds)]:
            handles = [kinds[k](lambda o, a, kw, k=k: calls.append((k, len(a), sorted(kw)))) for k in chosen]
            try:
                opt.step()
                opt.step(closure)
                opt.step(closure=closure)
            finally:
                for h in handles:
                    h.remove()
            opt.step()  # removed: nothing recorded
        swap = opt.register_step_pre_hook(lambda o, a, kw: ((o,), {"closure": closure}))
        opt.step()  # the hook hands the step a closure
        swap.remove()
        with torch.profiler.profile() as prof:
            opt.step()
        names = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
        return calls, len(closure_calls), [n.split("#")[1] for n in names]

    ours = run(lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.1, loss_scale=None, backend=backend))
    torchs = run(lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert ours[0] == torchs[0] and len(ours[0]) == 4 * 3 + 4 * 3
    assert ours[1] == torchs[1] == 2 * 5 + 1
    assert ours[2] == ["FusedMixedPrecisionSGD.step"] and torchs[2] == ["SGD.step"]


def test_a_subclass_step_runs_its_hooks_once_as_torchs_would():
    """A subclass overriding step() is wrapped by torch's own hook wrapper; its super().step()
    must then not run the hooks a second time. (torch.optim.SGD's subclasses run them twice
    once any plain SGD was built in the process, which wraps SGD.step too: not copied.)"""
    def run(base):
        class Sub(base):
            def step(self, closure=None):
                return super().step(closure)
        calls = []
        model = tiny_model("cpu", torch.float32)
        kwargs = dict(loss_scale=None) if base is fused_opt.FusedMixedPrecisionSGD else {}
        opt = Sub(model.parameters(), lr=0.1, **kwargs)
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        return calls, [p.detach().clone() for p in model.parameters()]
    ours, theirs = run(fused_opt.FusedMixedPrecisionSGD), run(torch.optim.SGD)
    assert ours[0] == ["pre", "post"]
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b)
