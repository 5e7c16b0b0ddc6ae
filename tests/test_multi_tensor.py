"""What the multi-tensor backends (triton, native) promise beyond the matrix: chunk
boundaries, mixed dtypes in one model, agreement with the torch backend, and a number of
launches that does not grow with the number of tensors."""
import contextlib
import math

import pytest
import torch

import fused_opt
from fused_opt.backends import multi_tensor
from harness import (BACKEND_DEVICES, Config, assert_close_fp32, make_grads,
                     run_against_reference, run_step)

FUSED = [(b, d) for b, d in BACKEND_DEVICES if b != "torch"]
FUSED_IDS = [f"{b}-{d}" for b, d in FUSED]
CHUNK = multi_tensor.CHUNK_SIZE


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunk_boundaries(dtype, backend, device):
    config = Config(dtype=dtype, sizes=(CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3), max_grad_norm=0.05,
                    inject={4: "inf"}, steps=8)
    run_against_reference(config, backend, device)


def mixed_model(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    specs = [(torch.float16, 300), (torch.bfloat16, 1500), (torch.float32, 77), (torch.float16, 5),
             (torch.bfloat16, 1), (torch.float32, 2100)]
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(device=device, dtype=dt)) for dt, n in specs]


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
def test_mixed_dtypes_agree_with_torch_backend(backend, device):
    """FP16, BF16 and FP32 params in one model and two groups: against the oracle."""
    results = {}
    for name in ("torch", backend):
        params = mixed_model(device)
        opt = fused_opt.FusedMixedPrecisionSGD(
            [{"params": params[:3]}, {"params": params[3:], "lr": 0.02, "nesterov": True}],
            lr=0.1, momentum=0.9, weight_decay=1e-3, max_grad_norm=0.1, init_scale=256.0, growth_interval=2,
            backend=name)
        config = Config()
        norms = []
        for step in range(8):
            grads = make_grads(config, params, step, float(opt.loss_scale))
            if step == 5:
                grads[2].view(-1)[0] = math.nan
            run_step(opt, params, grads)
            norms.append((opt.last_grad_norm.clone(), bool(opt.last_step_skipped), float(opt.loss_scale)))
        results[name] = (params, opt, norms)
    (ref_params, ref_opt, ref_norms), (params, opt, norms) = results["torch"], results[backend]
    for (rn, rs, rsc), (n, s, sc) in zip(ref_norms, norms):
        assert (rs, rsc) == (s, sc)
        if not rs:
            torch.testing.assert_close(n, rn, rtol=1e-5, atol=0)
    for i, (q, p) in enumerate(zip(ref_params, params)):
        if "master_param" not in ref_opt.state[q]:  # the harness's never-a-grad param
            assert "master_param" not in opt.state[p] and torch.equal(p, q)
            continue
        assert_close_fp32(opt.state[p]["master_param"], ref_opt.state[q]["master_param"], f"master {i}")
        assert_close_fp32(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], f"buffer {i}")
        if p.dtype != torch.float32:
            assert torch.equal(p.detach(), opt.state[p]["master_param"].to(p.dtype))


@contextlib.contextmanager
def count_launches(backend):
    """Counts kernel launches of the fused backend by wrapping its kernel entry points."""
    counts = {"launches": 0}
    if backend == "triton":
        from fused_opt.backends import triton_kernels as module
        names = ["partials_kernel", "finalize_kernel", "update_kernel"]

        class Counted:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                counts["launches"] += 1
                return self.kernel[grid]
        wrap = Counted
    else:
        from fused_opt.backends import native_backend as module
        names = module.LAUNCH_ENTRY_POINTS

        def wrap(fn):
            def counted(*args, **kwargs):
                counts["launches"] += 1
                return fn(*args, **kwargs)
            return counted
    originals = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, wrap(originals[n]))
        yield counts
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
def test_launches_do_not_grow_with_tensors(backend, device):
    """A model of 8 tensors and one of 300 (one dtype, three groups, one with a tensor lr):
    the same number of kernel launches, at most 3 per dtype pair plus one."""
    counts = []
    for n_tensors in (8, 300):
        params = [torch.nn.Parameter(torch.randn(5 + i % 7, device=device).half()) for i in range(n_tensors)]
        groups = [{"params": params[0::3]}, {"params": params[1::3], "momentum": 0.0},
                  {"params": params[2::3], "lr": torch.tensor(0.01, device=device)}]
        opt = fused_opt.FusedMixedPrecisionSGD(groups, lr=0.1, momentum=0.9, max_grad_norm=1.0, backend=backend)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.scale_loss(torch.zeros((), device=device))
        opt.step()  # first step builds the tables
        opt.scale_loss(torch.zeros((), device=device))
        with count_launches(backend) as c:
            opt.step()
        counts.append(c["launches"])
    assert counts[0] == counts[1] <= 4, counts


@pytest.mark.parametrize("flat_grads", [False, True], ids=["per-tensor", "flat"])
def test_native_one_call_step_equals_three_launches_bit_for_bit(flat_grads, monkeypatch):
    """The native module's `step` (one crossing from Python) against its three separate
    launches: every param, master, momentum buffer and scaler value bit-equal after steps
    with clipping, two groups, a tensor lr, an overflow and a grad that moves (per-tensor)."""
    from fused_opt.backends import native_backend

    def run(one_call):
        monkeypatch.setattr(native_backend, "ONE_CALL", one_call)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n).to(dt)) for n, dt in
                  ((1, torch.float16), (7, torch.bfloat16), (1023, torch.float16), (4097, torch.bfloat16))]
        groups = [{"params": params[:2], "lr": torch.tensor(0.05)}, {"params": params[2:], "nesterov": True}]
        opt = fused_opt.FusedMixedPrecisionSGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-3, max_grad_norm=0.5,
                                               backend="native", flat_grads=flat_grads, growth_interval=2)
        for step in range(6):
            for i, p in enumerate(params):
                g = torch.randn(p.shape) * 2.0**10
                if step == 3 and i == 2:
                    g[5] = float("inf")
                if flat_grads and p.grad is not None:
                    p.grad.copy_(g.to(p.dtype))
                else:
                    p.grad = g.to(p.dtype)
            opt.scale_loss(torch.zeros(()))
            opt.step()
        if flat_grads:
            assert opt.flat_grads_status == "active"
        return [t.clone() for p in params for t in (p.detach(), *opt.state[p].values()) if isinstance(t, torch.Tensor)] + [
            opt.loss_scale.clone(), opt._scaler.growth_tracker.clone(), opt._applied_steps.clone()]
    for a, b in zip(run(True), run(False), strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)


def test_native_one_call_step_checks_every_record_before_writing():
    """A record whose dtype code is unknown makes the module's `step` raise before its first
    launch: the scale, its counters and the partial slots are untouched."""
    from fused_opt.backends import native_backend
    module = native_backend._native_cpu
    scale = torch.tensor(8.0)
    counters = torch.zeros(4, dtype=torch.int32)
    slots = torch.full((2,), 7.0)
    flags = torch.zeros(2, dtype=torch.int32)
    scalars, norm, found = torch.zeros(4), torch.zeros(()), torch.zeros((), dtype=torch.bool)
    grads = torch.ones(4, dtype=torch.float16)
    table = torch.tensor([[grads.data_ptr(), 0, 0, 0, 4, 0, 0]], dtype=torch.int64)
    chunks = torch.tensor([[0, 0]], dtype=torch.int64)
    groups = torch.zeros(1, 8)
    for norm_code, update_code in ((9, 1), (1, 9)):
        norms = torch.tensor([[chunks.data_ptr(), 1, table.data_ptr(), slots.data_ptr(), flags.data_ptr(), norm_code]])
        # (chunks, num_chunks, table, grad dtype, param dtype, rule, EMA dtype, state precision)
        updates = torch.tensor([[chunks.data_ptr(), 1, table.data_ptr(), 1, update_code, 0, 0, 0]])
        with pytest.raises((ValueError, RuntimeError), match="dtype"):
            module.step(norms.data_ptr(), 1, updates.data_ptr(), 1, groups.data_ptr(), scalars.data_ptr(),
                        slots.data_ptr(), flags.data_ptr(), 1, scale.data_ptr(), counters[0:].data_ptr(),
                        counters[1:].data_ptr(), counters[2:].data_ptr(), counters[3:].data_ptr(), norm.data_ptr(),
                        found.data_ptr(), 1.0, 2.0, 0.5, 0.0, float("inf"), 1, 1, True, False, True, False, 65536, 0,
                        None, 0)
        assert scale.item() == 8.0 and not counters.any() and torch.equal(slots, torch.full((2,), 7.0))


def test_a_reduction_across_ranks_that_raises_inside_the_one_call_step_changes_nothing():
    """Sharded params' all-reduce runs inside the native step's one call, between the norm pass
    and the finalize: when it raises (a collective's error), the scale, its counters, the
    applied-step count, params, masters and buffers are as before."""
    params = [torch.nn.Parameter(torch.randn(n).half()) for n in (7, 1023)]
    opt = fused_opt.FusedMixedPrecisionSGD(params, lr=0.1, momentum=0.9, max_grad_norm=1.0, backend="native")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p) * opt.loss_scale.half()
        opt.scale_loss(torch.zeros(()))  # the grads stand for a scaled loss's
        opt.step()

    class Failing:  # stands in for distributed.ShardReduction
        members = [None]

        def __call__(self, stats, norm_inf):
            raise RuntimeError("the collective failed")
    opt._layouts.layout.reduce_stats = Failing()
    before = [t.clone() for t in (*params, *(opt.state[p][k] for p in params for k in ("master_param", "momentum_buffer")),
                                  opt.loss_scale, opt._scaler.growth_tracker, opt._applied_steps)]
    opt.scale_loss(torch.zeros(()))
    with pytest.raises(RuntimeError, match="the collective failed"):
        opt.step()
    after = [*params, *(opt.state[p][k] for p in params for k in ("master_param", "momentum_buffer")),
             opt.loss_scale, opt._scaler.growth_tracker, opt._applied_steps]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


class TwoRanksAlike:
    """Stands in for distributed.ShardReduction over one mesh of 2 ranks holding the same
    shards: the all-reduce doubles a sum and keeps a max. Records the pair each step sends."""
    members = [None]

    def __init__(self):
        self.sent = []

    def __call__(self, stats, norm_inf):
        self.sent.append(stats.clone())
        if not norm_inf:
            stats.mul_(2.0)
        return stats[0]


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_one_layout_folds_the_partials_around_the_all_reduce(backend, device, norm_type, monkeypatch):
    """Sharded params on one mesh: the native step folds its partials into the [statistic, inf
    flag] pair the all-reduce gets and reads the global pair back (the Triton backend folds
    with two tensor ops). The pair sent is this rank's, the norm the clip and skip use is the
    reduced one, and an inf on this rank reaches it."""
    from fused_opt import step_layout
    reduction = TwoRanksAlike()
    monkeypatch.setattr(step_layout, "shard_reduction", lambda params: reduction)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).half().to(device)) for n in (1, 7, 1023, 70000)]
    opt = fused_opt.FusedMixedPrecisionSGD(params, lr=0.1, momentum=0.9, max_grad_norm=1e-3, norm_type=norm_type,
                                           loss_scale=None, backend=backend)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).half().to(device) for p in params]
        if step == 1:
            grads[3][5] = math.inf
        for p, g in zip(params, grads):
            p.grad = g
        before = [p.detach().clone() for p in params]
        opt.step()
        flat = torch.cat([g.float().flatten() for g in grads])
        local = flat.abs().max() if norm_type == math.inf else flat.square().sum()
        sent = reduction.sent[-1].reshape(-1)
        if step == 1:
            assert sent[1].item() > 0 and opt.last_step_skipped.item()
            assert all(torch.equal(a, b) for a, b in zip(before, params))
            continue
        assert sent[1].item() == 0 and not opt.last_step_skipped.item()
        torch.testing.assert_close(sent[0].cpu(), local.cpu(), rtol=1e-5, atol=0)
        expected = local if norm_type == math.inf else (2.0 * local).sqrt()
        torch.testing.assert_close(opt.last_grad_norm.cpu(), expected.cpu(), rtol=1e-5, atol=0)
    assert len(reduction.sent) == 3


SPECIAL = [0.0, -0.0, 1.0, 65504.0, 65520.0, 70000.0, 1e-8, -6e-8, 5.96e-8, 2.98e-8, 1.0009765625,
           1.00048828125, 1.00146484375, 1.00390625, 1.005859375, 3.0e38, -3.3e38, 1.17e-38, 9e-41,
           float("inf"), float("-inf"), 0.1, -0.3, 1234.5678]


@pytest.mark.parametrize("backend,device", FUSED + [("torch", d) for d in sorted({d for _, d in FUSED})],
                         ids=FUSED_IDS + [f"torch-{d}" for d in sorted({d for _, d in FUSED})])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_write_back_rounds_like_torch(dtype, backend, device):
    """Halfway cases, subnormals, overflow and infinities: the written param is bit-equal to
    torch's .to() of the FP32 master. The kernel computes each master as 0 - lr * (-v / lr) = v
    exactly, from FP32 grads (the loaded zero masters equal the zero params, so nothing is
    re-taken); 3.4e38 overflows BF16 as 70000 overflows FP16. The huge values come from a
    group with lr = 2^70 (grads of 3.4e38 would overflow the norm's squares: a skipped step)."""
    values = torch.tensor([v for v in SPECIAL if abs(v) != float("inf")] + [3.4e38, -3.4e38]
                          + [v * 1.0001 for v in SPECIAL[1:15]], dtype=torch.float32)
    huge = values.abs() >= 2.0**60
    lrs = {False: 1.0, True: 2.0**70}
    parts = {k: values[huge == k] for k in (False, True)}
    params = {k: torch.nn.Parameter(torch.zeros(v.numel(), dtype=dtype, device=device)) for k, v in parts.items()}
    opt = fused_opt.FusedMixedPrecisionSGD([{"params": [params[k]], "lr": lrs[k]} for k in (False, True)],
                                           lr=1.0, loss_scale=None, backend=backend)
    for k, p in params.items():
        p.grad = torch.zeros_like(p)
        p.grad.data = (-parts[k] / lrs[k]).to(device)  # FP32 grads, as fp32_grad_accumulation's
    opt.step()
    assert not bool(opt.last_step_skipped)
    for k, p in params.items():
        master = opt.state[p]["master_param"]
        assert torch.equal(master.cpu(), parts[k])  # (as values: 0 - 0 gives +0 where v is -0)
        assert torch.equal(p.detach().cpu().view(torch.int16), master.cpu().to(dtype).view(torch.int16))


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
def test_non_dense_param_is_updated_in_place_and_nothing_else(backend, device):
    """A param that is a strided view (every other column of a buffer): the fused kernels see
    flat memory, so it goes through a staging copy; the columns in between stay untouched."""
    results = {}
    for name in ("torch", backend):
        base = torch.arange(48, dtype=torch.float32, device=device).reshape(6, 8).half()
        p = torch.nn.Parameter(base[:, ::2])
        q = torch.nn.Parameter(torch.linspace(-1, 1, 13, device=device).half())
        opt = fused_opt.FusedMixedPrecisionSGD([p, q], lr=0.1, momentum=0.9, loss_scale=None, backend=name)
        for step in range(3):
            p.grad = torch.full_like(p, 0.5 * (step + 1))
            q.grad = torch.full_like(q, -0.25)
            opt.step()
        results[name] = (base.clone(), p.detach().clone(), q.detach().clone())
    (base_ref, p_ref, q_ref), (base_out, p_out, q_out) = results["torch"], results[backend]
    assert torch.equal(base_out[:, 1::2], torch.arange(48, device=device).reshape(6, 8)[:, 1::2].half())
    assert torch.equal(p_out, p_ref) and torch.equal(q_out, q_ref)
