"""flat_grads=True (flat_storage.py): the reference matrix through the fast step, and each
semantic of the mode: unused and frozen params, zero_grad(set_to_none=True),
model.zero_grad(), replaced grads, `.data` swaps, state and group edits, checkpoints."""
import copy
import io
import math

import pytest
import torch

import fused_opt
from harness import (BACKEND_DEVICE_IDS, BACKEND_DEVICES, Config, check_against_reference, make_grads, make_params,
                     assign_groups, reference_for)
from test_matrix import CONFIGS, DTYPES

FLAT_CONFIGS = ["momentum", "nesterov-wd", "two-groups", "three-groups-mixed", "clip-l2", "clip-inf",
                "inf-injected", "nan-first-steps", "no-scale-nan", "growth-and-backoff", "maximize"]


def build_flat(config, backend, device, flat=True):
    params = make_params(config, device)
    groups, group_of = assign_groups(config, params)
    opt = fused_opt.FusedMixedPrecisionSGD(
        groups, max_grad_norm=config.max_grad_norm, norm_type=config.norm_type, loss_scale=config.loss_scale,
        init_scale=config.init_scale, growth_interval=config.growth_interval, backend=backend, flat_grads=flat)
    return params, opt, group_of


def write_grads(opt, params, grads):
    """As autograd would: into the existing .grad in place, else a new one."""
    opt.zero_grad()
    for p, g in zip(params, grads):
        if g is None:
            assert p.grad is None or not p.grad.any()
        elif p.grad is None:
            p.grad = g.to(p.device)
        else:
            p.grad.copy_(g)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", FLAT_CONFIGS)
def test_flat_grads_match_float64_reference(name, dtype, backend, device):
    config = Config(**{**CONFIGS[name].__dict__, "dtype": dtype})
    params, opt, group_of = build_flat(config, backend, device)
    ref = reference_for(config, params, group_of)
    statuses = []
    for step in range(config.steps):
        assert float(opt.loss_scale) == ref.scale, f"step {step}"
        grads = make_grads(config, params, step, float(opt.loss_scale))
        write_grads(opt, params, grads)
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()
        statuses.append(opt.flat_grads_status)
        norm, skipped = ref.step(grads)
        assert bool(opt.last_step_skipped) == skipped, f"step {step}"
        if not skipped:
            torch.testing.assert_close(float(opt.last_grad_norm), norm, rtol=1e-5, atol=1e-12)
        check_against_reference(opt, params, ref, f"step {step}")
    assert int(opt._scaler.growth_tracker) == ref.growth_tracker
    # Adopted after step 0, again after step 3 (the late param's first grad), fast since.
    assert statuses == ["active"] * config.steps
    never = params[-2]
    assert never.grad is None and "master_param" not in opt.state.get(never, {})


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_flat_equals_per_tensor_bit_for_bit_without_clipping(backend, device):
    # The norm pass reads flat runs, so with clipping the norm's last bits may differ; without
    # it every element's update is the same arithmetic: the same bits.
    config = Config(groups=[dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True,
                                 maximize=False)], inject={2: "inf"})
    runs = []
    for flat in (False, True):
        params, opt, _ = build_flat(config, backend, device, flat)
        for step in range(6):
            write_grads(opt, params, make_grads(config, params, step, float(opt.loss_scale)))
            opt.scale_loss(torch.zeros((), device=device))
            opt.step()
        runs.append([p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"] for p in params
                                                             if "momentum_buffer" in opt.state.get(p, {})])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict(dict(body=torch.nn.Linear(6, 5), head_a=torch.nn.Linear(5, 2),
                                    head_b=torch.nn.Linear(5, 2))).to(dtype)


def forward(model, x, use_b=True):
    h = torch.tanh(model["body"](x))
    out = model["head_a"](h)
    return out + model["head_b"](h) if use_b else out


def train(model, opt, steps, zero=lambda opt, model: opt.zero_grad(), use_b=lambda step: step % 2 == 0,
          scale=True, edit=None):
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        x = torch.randn(4, 6, generator=gen).to(next(model.parameters()).dtype)
        zero(opt, model)
        loss = forward(model, x, use_b(step)).float().square().mean()
        (opt.scale_loss(loss) if scale else loss).backward()
        if edit is not None:
            edit(step, model)
        opt.step()


HYPER = dict(lr=0.1, momentum=0.9, weight_decay=0.1)


def test_unused_params_left_alone_by_default_as_torch():
    # head_b is unused on odd steps: with set_to_none (the default) its grad is None then, and
    # torch's SGD leaves it alone: no weight decay, no momentum.
    ours, theirs = mlp(), mlp()
    train(ours, fused_opt.FusedMixedPrecisionSGD(ours.parameters(), loss_scale=None, **HYPER), 5, scale=False)
    train(theirs, torch.optim.SGD(theirs.parameters(), **HYPER), 5, scale=False)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flat_grads_step_unused_params_as_torch_with_set_to_none_false():
    # Flat grads stay allocated: an unused param has a zero grad and is stepped (weight decay,
    # momentum), as torch's SGD steps it after zero_grad(set_to_none=False). Documented.
    ours, theirs = mlp(), mlp()
    opt = fused_opt.FusedMixedPrecisionSGD(ours.parameters(), loss_scale=None, flat_grads=True, **HYPER)
    train(ours, opt, 5, scale=False)
    sgd = torch.optim.SGD(theirs.parameters(), **HYPER)
    train(theirs, sgd, 5, zero=lambda opt, model: opt.zero_grad(set_to_none=False), scale=False)
    assert opt.flat_grads_status == "active"
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_params_stay_out_and_unchanged():
    model = mlp(torch.float16)
    model["body"].requires_grad_(False)
    frozen = [p.detach().clone() for p in model["body"].parameters()]
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), flat_grads=True, **HYPER)
    train(model, opt, 4, use_b=lambda step: True)
    assert opt.flat_grads_status == "active"
    assert all(torch.equal(a, b) for a, b in zip(frozen, model["body"].parameters()))
    assert all(p.grad is None and p not in opt.state for p in model["body"].parameters())


def test_zero_grad_keeps_the_views_and_their_addresses():
    model = mlp(torch.float16)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), flat_grads=True, **HYPER)
    train(model, opt, 2, use_b=lambda step: True)
    addresses = [p.grad.data_ptr() for p in model.parameters()]
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    train(model, opt, 2, use_b=lambda step: True)
    assert [p.grad.data_ptr() for p in model.parameters()] == addresses
    assert opt.flat_grads_status == "active"
    # the buffers are views of one storage per grad dtype; state entries of one FP32 storage each
    assert len({p.grad.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    assert len({opt.state[p]["master_param"].untyped_storage().data_ptr() for p in model.parameters()}) == 1


def per_tensor_twin(dtype=torch.float16, **kw):
    """(flat model, flat opt, default model, default opt) built alike."""
    a, b = mlp(dtype), mlp(dtype)
    return (a, fused_opt.FusedMixedPrecisionSGD(a.parameters(), flat_grads=True, **HYPER, **kw),
            b, fused_opt.FusedMixedPrecisionSGD(b.parameters(), **HYPER, **kw))


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), (p, q)


def test_model_zero_grad_every_step_is_exact_then_gives_up_adopting():
    # model.zero_grad() frees every .grad (set_to_none): the weakrefs see it, the step takes
    # the per-tensor path (unused params then really are left alone), and after two storages
    # dropped before any fast step, adopting stops.
    a, flat, b, default = per_tensor_twin()
    zero = lambda opt, model: model.zero_grad()  # noqa: E731
    train(a, flat, 6, zero=zero)
    train(b, default, 6, zero=zero)
    assert_same_params(a, b)
    assert flat.flat_grads_status.startswith("off: .grad was replaced")


@pytest.mark.parametrize("how", ["replace", "none", "data", "set_to_none_then_backward"])
def test_grads_taken_away_are_seen(how):
    def edit(step, model):
        p = model["head_a"].weight
        if step == 2 and how == "replace":
            p.grad = torch.full_like(p, 3.0)
        if step == 2 and how == "none":
            p.grad = None
        if step == 2 and how == "data":
            p.grad.data = torch.full_like(p, -2.0)
    a, flat, b, default = per_tensor_twin(loss_scale=None)
    zero = (lambda opt, model: opt.zero_grad()) if how != "set_to_none_then_backward" else \
        (lambda opt, model: (opt.zero_grad(), model["head_a"].zero_grad()))  # a module frees its grads
    train(a, flat, 5, edit=edit, zero=zero, scale=False, use_b=lambda s: True)
    train(b, default, 5, edit=edit, zero=zero, scale=False, use_b=lambda s: True)
    assert_same_params(a, b)


@pytest.mark.parametrize("how", ["new_storage", "half_after", "inplace"])
def test_params_changed_outside_are_seen(how):
    def edit(step, model):
        if step != 2:
            return
        p = model["body"].weight
        if how == "new_storage":
            p.data = torch.full_like(p, 0.25)
        if how == "inplace":
            torch.nn.init.constant_(p, 0.5)
    # half_after: no loss scale asked for (with "auto" the FP16 params would turn one on: test_drop_in)
    a, flat, b, default = (per_tensor_twin(torch.float32, loss_scale=None) if how == "half_after"
                           else per_tensor_twin(torch.float16))
    if how == "half_after":  # model.half() after the optimizer was built: p.data = p.data.half()
        def edit(step, model):  # noqa: F811
            if step == 2:
                model.half()
    train(a, flat, 5, edit=edit, use_b=lambda s: True)
    train(b, default, 5, edit=edit, use_b=lambda s: True)
    assert_same_params(a, b)


def test_state_and_group_edits_are_seen():
    a, flat, b, default = per_tensor_twin()

    def edit(step, model, opt):
        if step == 2:
            opt.state.clear()  # the usual momentum reset
        if step == 3:
            opt.param_groups[0]["params"].pop()  # head_b.bias leaves the optimizer
    train(a, flat, 5, edit=lambda s, m: edit(s, m, flat), use_b=lambda s: True)
    train(b, default, 5, edit=lambda s, m: edit(s, m, default), use_b=lambda s: True)
    assert_same_params(a, b)
    assert flat.flat_grads_status == "active"


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-tensor"])
def test_hyperparameter_edits_between_steps_take_effect_as_in_torch(flat):
    """The step re-validates a group only when one of its values is a new object: every edit
    a scheduler or a user makes is one (a new float, a new tensor, True/False), so each must
    change the next step exactly as it changes torch.optim.SGD's, in the flat fast step too."""
    edits = {1: dict(lr=0.05), 2: dict(weight_decay=1e-2), 3: dict(momentum=0.5), 4: dict(nesterov=True),
             5: dict(maximize=True), 6: dict(dampening=0.0, nesterov=False), 7: dict(lr=torch.tensor(0.2))}

    def run(make):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n)) for n in (1, 7, 1023)]
        opt = make(ps)
        for step in range(9):
            opt.param_groups[0].update(edits.get(step, {}))
            for p in ps:
                g = torch.randn(p.shape)
                if flat and isinstance(opt, fused_opt.FusedMixedPrecisionSGD) and p.grad is not None:
                    p.grad.copy_(g)  # flat grads stay views
                else:
                    p.grad = g
            opt.step()
        if flat and isinstance(opt, fused_opt.FusedMixedPrecisionSGD):
            assert opt.flat_grads_status == "active"
        return [p.detach().clone() for p in ps]

    ours = run(lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.1, momentum=0.9, loss_scale=None,
                                                           backend="native", flat_grads=flat))
    theirs = run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_no_whole_flat_buffer():
    sizes = {}
    for flat in (False, True):
        model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)]).half()
        opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), flat_grads=flat, **HYPER)
        train_seq(model, opt)
        sd = opt.state_dict()
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        sizes[flat] = len(buffer.getvalue())
        one = io.BytesIO()
        torch.save(sd["state"][0]["master_param"], one)
        assert len(one.getvalue()) < 64 * 64 * 4 + 2000  # one tensor, not the whole buffer
        # loads into the default mode and into torch's SGD
        twin = copy.deepcopy(model)
        fused_opt.FusedMixedPrecisionSGD(twin.parameters(), **HYPER).load_state_dict(sd)
        torch.optim.SGD(copy.deepcopy(model).float().parameters(), **HYPER).load_state_dict(sd)
    assert sizes[True] <= sizes[False] * 1.05, sizes


def train_seq(model, opt, steps=3):
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(step)).half()
        opt.scale_loss(model(x).float().square().mean()).backward()
        opt.step()


def test_resume_from_flat_checkpoint_is_bit_identical():
    model, opt = trained_flat(3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 3, use_b=lambda s: True)
    again = mlp(torch.float16, seed=5)
    again.load_state_dict(saved_model)
    opt2 = fused_opt.FusedMixedPrecisionSGD(again.parameters(), flat_grads=True, **HYPER)
    opt2.load_state_dict(saved_opt)
    train(again, opt2, 3, use_b=lambda s: True)
    assert_same_params(model, again)


def trained_flat(steps=2):
    model = mlp(torch.float16)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), flat_grads=True, **HYPER)
    train(model, opt, steps, use_b=lambda s: True)
    return model, opt


def test_deepcopy_steps_like_the_original():
    model, opt = trained_flat()
    model2, opt2 = copy.deepcopy((model, opt))
    train(model, opt, 2, use_b=lambda s: True)
    train(model2, opt2, 2, use_b=lambda s: True)
    assert_same_params(model, model2)


def test_step_between_scale_loss_and_backward_raises():
    model, opt = trained_flat()
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.scale_loss(forward(model, torch.ones(2, 6).half(), True).float().sum())
    with pytest.raises(RuntimeError, match="between scale_loss"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    loss.backward()
    opt.step()


def test_clipping_scaled_flat_grads_raises():
    model, opt = trained_flat()
    opt.zero_grad()
    opt.scale_loss(forward(model, torch.ones(2, 6).half(), True).float().sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()


def test_refusals_and_fallbacks():
    base = torch.zeros(10, dtype=torch.float16)
    gappy = torch.nn.Parameter(base[::2])  # a view with gaps: stays per-tensor, exact
    opt = fused_opt.FusedMixedPrecisionSGD([gappy], lr=0.1, flat_grads=True)
    gappy.grad = torch.ones(5, dtype=torch.float16)
    opt.scale_loss(torch.zeros(()))
    opt.step()
    assert opt.flat_grads_status.startswith("off: a param that is a view with gaps")
    assert fused_opt.FusedMixedPrecisionSGD(mlp().parameters()).flat_grads_status is None


def test_grads_are_zero_not_none_after_adoption_and_step_keeps_them():
    model = mlp(torch.float16)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), flat_grads=True, **HYPER)
    opt.zero_grad()
    opt.scale_loss(forward(model, torch.ones(2, 6).half(), True).float().sum() * 1e-3).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()  # adopts: the views hold the same values
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert math.isfinite(float(opt.last_grad_norm))


def test_zero_grad_clears_what_the_flat_storage_does_not_hold():
    # A grad hand-set on a frozen (left-out) param, and the params of a group added after the
    # storage was adopted, are cleared by opt.zero_grad() as torch would clear them.
    model = mlp(torch.float16)
    model["body"].requires_grad_(False)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), flat_grads=True, **HYPER)
    train(model, opt, 2, use_b=lambda s: True)
    frozen = model["body"].weight
    frozen.grad = torch.ones_like(frozen)
    opt.zero_grad()
    assert frozen.grad is None and opt.flat_grads_status == "active"
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones_like(extra)
    opt.zero_grad()
    assert extra.grad is None


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_fp32_grads_of_fp16_params_megatron_style(backend, device):
    # p.grad.data = an FP32 buffer (Megatron's main_grad idiom): autograd then adds each
    # FP16 grad into it. Flat storage keeps such a grad FP32 (a view into the FP32 buffer),
    # and steps like the per-tensor path, bit for bit; every step is counted once.
    def run(flat):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device).half()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
            p.grad.data = torch.zeros_like(p, dtype=torch.float32)
        opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend,
                                               flat_grads=flat, init_scale=2.0**8)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            opt.zero_grad(set_to_none=False)
            x = torch.randn(8, 8, generator=gen).to(device, torch.float16)
            opt.scale_loss(model(x).float().square().mean()).backward()
            assert all(p.grad.dtype == torch.float32 for p in model.parameters())
            opt.step()
        return model, opt

    (flat_model, flat_opt), (model, opt) = run(True), run(False)
    assert flat_opt.flat_grads_status == "active" and int(flat_opt._applied_steps) == 4
    assert all(torch.equal(a, b) for a, b in zip(flat_model.parameters(), model.parameters()))
