"""Gradient accumulation over micro-batches: k backward passes of loss / k, then one step.

In .grad (the default) and in FP32 buffers (`fp32_grad_accumulation=True`): both equal one
big batch, every micro-batch is scaled by the same loss scale, an overflowing micro-batch
skips the whole step, and the FP32 sum is closer to a float64 reference than the FP16 one."""
import math

import pytest
import torch

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES

K = 16


def make(dtype, device, backend, fp32_accumulation, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(device, dtype)
    model[2].bias.requires_grad_(False)  # a param that never gets a grad: never stepped
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, init_scale=2.0**10,
                                           fp32_grad_accumulation=fp32_accumulation, backend=backend,
                                           **{"loss_scale": "dynamic", **kwargs})
    return model, opt


def batch(device, dtype, n=K * 4):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 32, generator=gen).to(device, dtype), torch.randn(n, 8, generator=gen).to(device, dtype)


def accumulate(model, opt, x, y, k=K, inf_at=None):
    """One optimizer step over k micro-batches; returns the scale each micro-batch used."""
    scales = []
    for i, (xi, yi) in enumerate(zip(x.chunk(k), y.chunk(k))):
        scales.append(float(opt.loss_scale))
        loss = torch.nn.functional.mse_loss(model(xi).float(), yi.float()) / k
        if i == inf_at:
            loss = loss * math.inf
        opt.scale_loss(loss).backward()
    opt.step()
    opt.zero_grad()
    return scales


def masters(model, opt):
    return [opt.state[p]["master_param"].clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("fp32_accumulation", [False, True], ids=["grad", "fp32"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_accumulation_equals_one_big_batch(backend, device, fp32_accumulation):
    dtype = torch.float32 if not fp32_accumulation else torch.float16
    x, y = batch(device, dtype)
    model, opt = make(dtype, device, backend, fp32_accumulation, growth_interval=1)
    big, big_opt = make(dtype, device, backend, fp32_accumulation, growth_interval=1)
    for _ in range(3):
        scales = accumulate(model, opt, x, y)
        assert len(set(scales)) == 1  # the scale changes in step() only ...
        accumulate(big, big_opt, x, y, k=1)
    assert float(opt.loss_scale) == 2.0**13  # ... where it grew (growth_interval=1)
    # FP32 params: equal up to FP32 summation order. FP16 params: the big batch's grad is one
    # FP16 rounding of the sum, the accumulation's is exact in FP32 up to the micro-batches' own.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=2e-4)
    for a, b in zip(masters(model, opt), masters(big, big_opt)):
        torch.testing.assert_close(a, b, **tol)
    assert model[2].bias.grad is None and torch.equal(model[2].bias, big[2].bias)


def float64_sums(model, x, y):
    """The float64 sums of the very FP16 micro-batch grads both runs accumulate: what is left
    of the difference is the accumulation's own rounding."""
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters() if p.requires_grad]
    for xi, yi in zip(x.chunk(K), y.chunk(K)):
        model.zero_grad()
        (torch.nn.functional.mse_loss(model(xi).float(), yi.float()) / K).backward()
        for total, p in zip(sums, [p for p in model.parameters() if p.requires_grad]):
            total += p.grad.double()
    model.zero_grad()
    return sums


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_fp32_accumulation_is_closer_to_float64_than_fp16(backend, device):
    x, y = batch(device, torch.float16)
    errors = {}
    for fp32_accumulation in (False, True):
        model, opt = make(torch.float16, device, backend, fp32_accumulation, loss_scale=None)
        start = [p.detach().double() for p in model.parameters() if p.requires_grad]
        twin, _ = make(torch.float16, device, "torch", False)  # same weights, no hooks on its .grad
        reference = [w - 0.1 * g for w, g in zip(start, float64_sums(twin, x, y))]  # first step: buffer = grad
        accumulate(model, opt, x, y)
        errors[fp32_accumulation] = max(float((m.double() - r).abs().max() / (r - w).abs().max())
                                        for m, r, w in zip(masters(model, opt), reference, start))
    # Relative to the update: FP16 sums lose ~2^-11 per add, FP32 sums ~2^-24.
    assert errors[True] < 1e-5 and errors[False] > 1e-4, errors


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_fp32_accumulation_overflowing_micro_batch_skips_the_step(backend, device):
    x, y = batch(device, torch.float16)
    model, opt = make(torch.float16, device, backend, True)
    accumulate(model, opt, x, y)
    before = masters(model, opt) + [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()
                                     if p.requires_grad]
    scales = accumulate(model, opt, x, y, inf_at=5)
    assert bool(opt.last_step_skipped) and float(opt.loss_scale) == scales[0] / 2
    after = masters(model, opt) + [opt.state[p]["momentum_buffer"] for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # The skipped step consumed the sums: the next accumulation starts clean and is applied.
    accumulate(model, opt, x, y)
    assert not bool(opt.last_step_skipped)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_fp32_accumulation_grad_is_the_fp32_sum_with_torchs_semantics(backend, device):
    # After backward .grad is the FP32 sum (the FP16 grad's memory is gone); a step without
    # zero_grad leaves it to be added to, as torch's .grad; its buffer is kept across steps.
    x, y = batch(device, torch.float16)
    model, opt = make(torch.float16, device, backend, True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt.scale_loss(torch.nn.functional.mse_loss(model(x[:4]).float(), y[:4].float())).backward()
    assert all(p.grad.dtype == torch.float32 for p in trainable)
    first = [p.grad.clone() for p in trainable]
    buffers = [p.grad.data_ptr() for p in trainable]
    opt.step()
    assert all(torch.equal(p.grad, f) for p, f in zip(trainable, first))  # not consumed by the step
    opt.scale_loss(torch.nn.functional.mse_loss(model(x[4:8]).float(), y[4:8].float())).backward()
    assert [p.grad.data_ptr() for p in trainable] == buffers  # added in place
    assert all(not torch.equal(p.grad, f) for p, f in zip(trainable, first))
    opt.zero_grad()
    assert all(p.grad is None for p in trainable)
    opt.scale_loss(torch.nn.functional.mse_loss(model(x[:4]).float(), y[:4].float())).backward()
    assert [p.grad.data_ptr() for p in trainable] == buffers  # the same FP32 buffers again


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("flat", [False, True], ids=["per-tensor", "flat"])
@pytest.mark.parametrize("discard", ["model.zero_grad()", "p.grad = None", "opt.zero_grad()"])
def test_a_discarded_micro_batch_is_not_applied(backend, device, flat, discard):
    # A micro-batch thrown away before the step is not in the step, as with torch's .grad:
    # equal, bit for bit, to a run that never computed it.
    x, y = batch(device, torch.float16)

    def run(with_discarded):
        model, opt = make(torch.float16, device, backend, True, flat_grads=flat)
        for step in range(4):
            opt.zero_grad()
            if with_discarded and step == 2:
                opt.scale_loss(torch.nn.functional.mse_loss(model(x[8:12]).float(), y[8:12].float())).backward()
                if discard == "model.zero_grad()":
                    model.zero_grad()
                elif discard == "p.grad = None":
                    for p in model.parameters():
                        p.grad = None
                else:
                    opt.zero_grad()
            for k in (0, 4):
                loss = torch.nn.functional.mse_loss(model(x[k:k + 4]).float(), y[k:k + 4].float())
                opt.scale_loss(loss / 2).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    (with_it, opt), (without, _) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(with_it, without))
    if flat:
        assert opt.flat_grads_status == "active"


def test_fp32_accumulation_a_grad_set_after_backward_replaces_the_sum():
    # As torch: p.grad = g after backward is the grad the step uses (here equal to a run
    # without FP32 accumulation that sets the same grad after the same single backward).
    x = torch.ones(2, 32, dtype=torch.float16)
    runs = []
    for accumulate_fp32 in (True, False):
        model, opt = make(torch.float16, "cpu", "torch", accumulate_fp32)
        opt.scale_loss(model(x).float().sum()).backward()
        p = next(model.parameters())
        p.grad = torch.ones_like(p)
        opt.step()
        runs.append([q.detach().clone() for q in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fp32_accumulation_hooks_belong_to_one_live_optimizer():
    import gc
    model, first = make(torch.float16, "cpu", "torch", True)
    with pytest.raises(ValueError, match="another live optimizer"):
        fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, fp32_grad_accumulation=True, backend="torch")
    del first
    gc.collect()  # its hooks go with it: the next optimizer gets every grad
    second = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, fp32_grad_accumulation=True,
                                              backend="torch")
    second.scale_loss(model(torch.ones(2, 32, dtype=torch.float16)).float().sum()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad.dtype == torch.float32 for p in trainable)
    assert len(second._accumulator.handles) == len(trainable)


# -- with flat_grads=True: the FP32 sums are views into the flat FP32 grad buffer ----------

class Mixed(torch.nn.Module):
    """FP16 layers, an FP32 layer (its .grad accumulates in FP32 itself, no hook), a frozen
    layer and a head used on some micro-batches only."""

    def __init__(self, device):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(32, 16).to(device, torch.float16)
        self.frozen = torch.nn.Linear(16, 16).to(device, torch.float16).requires_grad_(False)
        self.fp32 = torch.nn.Linear(16, 8).to(device)
        self.side = torch.nn.Linear(16, 8).to(device, torch.float16)

    def forward(self, x, use_side):
        h = torch.tanh(self.frozen(torch.tanh(self.body(x)))).float()
        out = self.fp32(h)
        return out + self.side(h.half()).float() if use_side else out


def run_mixed(flat, backend, device, plan, hand_set_at=None):
    """Per-tensor runs zero with set_to_none=False: what flat storage does (README "flat
    grads": an unused param gets a zero grad and is stepped)."""
    """plan: per step, (micro-batches, whether they use `side`, zero_grad first, inf in micro-batch k)."""
    model = Mixed(device)
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01,
                                           fp32_grad_accumulation=True, flat_grads=flat, backend=backend,
                                           loss_scale="dynamic", init_scale=2.0**10, growth_interval=2)
    gen = torch.Generator().manual_seed(5)
    statuses = []
    for k, use_side, zero, inf_at in plan:
        if zero:
            opt.zero_grad(set_to_none=False)
        for i in range(k):
            x = torch.randn(4, 32, generator=gen).to(device, torch.float16)
            loss = model(x, use_side).square().mean() / k
            opt.scale_loss(loss * math.inf if i == inf_at else loss).backward()
        opt.step()
        statuses.append((opt.flat_grads_status, opt._flat_grads.ran if flat else 0))
    state = [t for p in model.parameters() if p in opt.state for t in opt.state[p].values()]
    return [p.detach().clone() for p in model.parameters()] + state + [opt.loss_scale], statuses, model, opt


PLAN = [(3, True, True, None), (2, True, False, None), (4, True, True, None), (1, False, True, None),
        (2, False, False, None), (3, True, True, 1), (2, True, True, None), (2, True, False, None)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_flat_fp32_accumulation_equals_per_tensor_bit_for_bit(backend, device):
    # No clipping: the flat step's arithmetic is per element the per-tensor step's, so the
    # same bits, over micro-batches, steps with and without zero_grad, a head unused on some
    # steps (not stepped then, as torch), an overflow (skipped), FP32 and frozen params.
    exact, _, _, _ = run_mixed(False, backend, device, PLAN)
    flat, statuses, model, opt = run_mixed(True, backend, device, PLAN)
    assert len(exact) == len(flat) and all(torch.equal(a, b) for a, b in zip(exact, flat))
    # The fast step ran wherever the same params got grads as in the step before; the others
    # went down the per-tensor path (the head unused, then used again) and re-adopted.
    assert [s for s, _ in statuses] == ["active"] * len(PLAN)
    assert [ran for _, ran in statuses] == list(range(len(PLAN)))  # the fast step from the second step on
    buffers = opt._flat_grads.storage.grad_buffers
    assert list(buffers) == [torch.float32]  # the sums and the FP32 param's grads: one buffer
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and p.grad.untyped_storage().data_ptr() == buffers[torch.float32].data_ptr()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_flat_fp32_accumulation_a_grad_set_after_backward_replaces_the_sum(backend, device):
    # The hand-set grad drops the flat view: that step is per-tensor, with the hand-set
    # grad, as the per-tensor mode steps.
    results = []
    for flat in (True, False):
        _, statuses, model, opt = run_mixed(flat, backend, device, PLAN[:3])
        opt.scale_loss(model(torch.ones(2, 32, dtype=torch.float16, device=device), True).square().mean()).backward()
        model.body.weight.grad = torch.ones_like(model.body.weight)
        opt.step()
        results.append([q.detach().clone() for q in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_flat_fp32_accumulation_with_model_zero_grad_and_a_new_group():
    # model.zero_grad() frees the FP32 param's view (seen: per-tensor step, re-adopted);
    # a group added later is stepped from its first grad on.
    model = Mixed("cpu")
    twin = Mixed("cpu")
    opts = [fused_opt.FusedMixedPrecisionSGD(m.parameters(), lr=0.1, momentum=0.9, fp32_grad_accumulation=True,
                                             flat_grads=flat) for m, flat in ((model, True), (twin, False))]
    extra = [torch.nn.Parameter(torch.ones(3, dtype=torch.float16)) for _ in range(2)]
    for step in range(5):
        for m, opt, e in zip((model, twin), opts, extra):
            if step == 2:
                m.zero_grad()
            if step == 3:
                opt.add_param_group({"params": [e]})
            x = torch.ones(2, 32, dtype=torch.float16) * (step + 1) / 10
            loss = m(x, True).square().mean() + (e.float().square().sum() * 1e-3 if step >= 3 else 0)
            opt.scale_loss(loss).backward()
            opt.step()
    for a, b in zip(list(model.parameters()) + extra[:1], list(twin.parameters()) + extra[1:]):
        assert torch.equal(a, b)
    assert not torch.equal(extra[0], torch.ones(3, dtype=torch.float16))


def test_flat_fp32_accumulation_copy_mid_accumulation_steps_like_the_original():
    import copy
    _, _, model, opt = run_mixed(True, "native", "cpu", PLAN[:3])
    x = torch.ones(2, 32, dtype=torch.float16)
    opt.scale_loss(model(x, True).square().mean()).backward()  # a sum in the flat buffer, pending
    model2, opt2 = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (model2, opt2)):
        o.scale_loss(m(x * 2, True).square().mean()).backward()
        o.step()
    # The FP16 params' sums travel with the optimizer; the FP32 layer's .grad does not travel
    # with the model (torch's Parameter.__deepcopy__ drops grads), so it is left out here.
    pairs = [(a, b) for a, b in zip(model.parameters(), model2.parameters()) if a.dtype == torch.float16]
    assert len(pairs) == 6 and all(torch.equal(a, b) for a, b in pairs)


def test_add_param_group_refused_for_a_param_another_optimizer_accumulates_changes_nothing():
    # The refusal comes before the group is appended: the param is not stepped by this one.
    owner_model, owner = make(torch.float16, "cpu", "torch", True)
    p = next(owner_model.parameters())
    other = fused_opt.FusedMixedPrecisionSGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))], lr=0.1,
                                             fp32_grad_accumulation=True, loss_scale=None)
    groups_before = len(other.param_groups)
    with pytest.raises(ValueError, match="another live optimizer"):
        other.add_param_group({"params": [p]})
    assert len(other.param_groups) == groups_before
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    other.param_groups[0]["params"][0].grad = torch.ones(3, dtype=torch.float16)
    other.step()
    assert torch.equal(p.detach(), before)
    assert other.param_groups[0]["params"] == [other.param_groups[0]["params"][0]]
