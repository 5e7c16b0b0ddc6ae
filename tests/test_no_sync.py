"""No host sync in step(): nothing reads a device value on the host, so a step can
be captured in a CUDA graph. On CPU a sync is invisible, so the reads themselves are trapped."""
import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES

FORBIDDEN_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default}


class RejectHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in FORBIDDEN_OPS:
            raise AssertionError(f"host sync inside step(): {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync inside step(): Tensor.{name}")
        return method
    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
            m.setattr(torch.Tensor, name, refuse(name))
        with RejectHostReads():
            yield


def steps_without_host_reads(opt, params, device, monkeypatch) -> None:
    """Five steps, two of them overflows, each under the trap; the skip as the grads say."""
    for step, bad in enumerate([False, True, False, False, True]):
        for p in params:
            p.grad = torch.full_like(p, math.inf if bad else 0.01)
        opt.scale_loss(torch.zeros((), device=device))
        with no_host_reads(monkeypatch):
            opt.step()
        assert bool(opt.last_step_skipped) == bad, f"step {step}"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_step_never_reads_device_values(lr_kind, backend, device, monkeypatch):
    params = [torch.nn.Parameter(torch.randn(n).half().to(device)) for n in (3, 1025)]
    params.append(torch.nn.Parameter(torch.randn(4).to(device)))
    lr = 0.1 if lr_kind == "float" else torch.tensor(0.1, device=device)
    opt = fused_opt.FusedMixedPrecisionSGD(
        [{"params": params[:2]}, {"params": params[2:], "momentum": 0.5, "nesterov": True}],
        lr=lr, momentum=0.9, weight_decay=1e-4, max_grad_norm=1.0, growth_interval=2, backend=backend)
    steps_without_host_reads(opt, params, device, monkeypatch)


def test_the_trap_catches_a_sync(monkeypatch):
    """The trap is real: an .item() or an add_ with a tensor alpha inside it is caught."""
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_reads(monkeypatch):
            x.sum().item()
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_reads(monkeypatch):
            x.add_(x, alpha=torch.tensor(0.5))


@pytest.mark.parametrize("device", sorted({d for _, d in BACKEND_DEVICES}))
@pytest.mark.parametrize("kind", ["muon", "musgd"])
@pytest.mark.parametrize("state_precision", ["fp32", "int8"])
def test_muon_and_musgd_never_read_device_values(kind, state_precision, device, monkeypatch):
    """The matrix stage too: batched Newton-Schulz on the device, the skip decided there."""
    params = [torch.nn.Parameter(torch.randn(*s).bfloat16().to(device)) for s in ((8, 4), (8, 4), (4, 2, 3, 3), (7,))]
    lr = torch.tensor(0.02, device=device)
    common = dict(lr=lr, max_grad_norm=1.0, loss_scale="dynamic", growth_interval=2, state_precision=state_precision,
                  master_weights="remainder8", ema_decay=0.9)
    if kind == "muon":
        opt = fused_opt.FusedMixedPrecisionMuon([{"params": params[:3]}, {"params": params[3:], "algorithm": "adamw"}],
                                                **common)
    else:
        opt = fused_opt.FusedMixedPrecisionMuSGD([{"params": params[:3], "use_muon": True}, {"params": params[3:]}],
                                                 momentum=0.9, **common)
    steps_without_host_reads(opt, params, device, monkeypatch)
