"""torch.distributed DDP (gloo, 2 processes on 127.0.0.1): the optimizer runs unchanged on
DDP-averaged grads, and the result equals one process training on the whole batch."""
import datetime
import sys

import pytest
import torch
import torch.distributed as dist

import fused_opt
from fused_opt.bench.ranks import run_ranks  # noqa: F401 (the other tests import it from here)
from harness import BACKEND_DEVICES

CPU_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cpu"]
STEPS = 6


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 16, 8, generator=gen), torch.randn(STEPS, 16, 4, generator=gen)


def train(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        opt.scale_loss(loss).backward()
        opt.step()


def make_opt(params, backend, optimizer="sgd", **kw):
    # max_grad_norm small enough that clipping is active on every step
    if optimizer in ("muon", "musgd"):  # the matrices orthogonalized, the biases on AdamW / SGD
        params = list(params)
        matrices, biases = [p for p in params if p.dim() == 2], [p for p in params if p.dim() != 2]
        common = dict(max_grad_norm=0.3, init_scale=2.0**8, loss_scale="dynamic", backend=backend, **kw)
        if optimizer == "muon":
            return fused_opt.FusedMixedPrecisionMuon([dict(params=matrices), dict(params=biases, algorithm="adamw")],
                                                     lr=0.02, **common)
        return fused_opt.FusedMixedPrecisionMuSGD([dict(params=matrices, use_muon=True), dict(params=biases)],
                                                  lr=0.05, momentum=0.9, nesterov=True, **common)
    if optimizer == "adamw":
        return fused_opt.FusedMixedPrecisionAdamW(params, lr=1e-2, max_grad_norm=0.3, init_scale=2.0**8,
                                                  loss_scale="dynamic", backend=backend, **kw)
    return fused_opt.FusedMixedPrecisionSGD(params, lr=0.1, momentum=0.9, max_grad_norm=0.3, init_scale=2.0**8,
                                            loss_scale="dynamic", backend=backend, **kw)


def worker(rank, world, init_method, backend, out, optimizer="sgd"):
    init_group(init_method, rank, world, "gloo")
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = make_opt(ddp.parameters(), backend, optimizer)
        xs, ys = data()
        half = 16 // world
        train(ddp, opt, xs[:, rank * half:(rank + 1) * half], ys[:, rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save([p.detach() for p in ddp.module.parameters()], out)
    finally:
        finish_group()


def finish_group() -> None:
    """A worker's teardown: every rank waits until all are done (rank 0 has written the
    result), then the group goes. A teardown crash after this cannot lose the result."""
    try:
        if sys.exc_info()[0] is None:  # a rank that raised leaves at once (the test fails fast)
            dist.barrier()
    finally:
        dist.destroy_process_group()


# Stores the test process creates and keeps until it exits (see rendezvous).
_STORES = []


def rendezvous(tmp_path=None) -> str:
    """A TCPStore this process creates on port 0 and keeps listening: unlike a port taken with
    bind(0) and let go, no other test (or xdist worker) can take it before the ranks meet on
    it; unlike a file store, no rank's exit deletes it under the others (a FileStore's file
    goes with the first rank to tear down, and the rest then wait minutes at exit)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    _STORES.append(store)
    return f"127.0.0.1:{store.port}"


# Far below gloo's default 30 minutes, so a broken rendezvous or collective fails inside the
# per-test timeout; far above a collective's worst wait here, with 2 cores shared by every
# process of the suite (60 s was too short once nvcc ran beside the Triton interpreter).
TIMEOUT_S = 300


def init_group(address: str, rank: int, world: int, backend: str = "gloo", timeout_s: float = TIMEOUT_S) -> None:
    host, port = address.rsplit(":", 1)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


@pytest.mark.parametrize("backend,optimizer", [(b, "sgd") for b in CPU_BACKENDS] + [("native", "adamw"), ("torch", "muon"),
                                                                                 ("torch", "musgd")])
def test_ddp_two_processes_equal_one_process(backend, optimizer, tmp_path):
    out = str(tmp_path / "params.pt")
    run_ranks(worker, (2, rendezvous(tmp_path), backend, out, optimizer), 2, out)
    ddp_params = torch.load(out)
    model = make_model()
    train(model, make_opt(model.parameters(), backend, optimizer), *data())
    for a, b in zip(ddp_params, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def flat_worker(rank, world, init_method, bucket_view, out):
    """flat_grads=True under DDP: without gradient_as_bucket_view DDP copies the reduced grads
    into .grad in place (our views stay: the fast step runs); with it, DDP points .grad at its
    own bucket every backward, so adopting stops and the step stays per-tensor. Exact both ways."""
    init_group(init_method, rank, world, "gloo")
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(make_model(), gradient_as_bucket_view=bucket_view)
        opt = make_opt(ddp.parameters(), "native", flat_grads=True)
        xs, ys = data()
        half = 16 // world
        statuses = []
        for x, y in zip(xs[:, rank * half:(rank + 1) * half], ys[:, rank * half:(rank + 1) * half]):
            train(ddp, opt, x[None], y[None])
            statuses.append(opt.flat_grads_status)
        if rank == 0:
            torch.save(dict(params=[p.detach() for p in ddp.module.parameters()], statuses=statuses), out)
    finally:
        finish_group()


@pytest.mark.parametrize("bucket_view", [False, True], ids=["copies", "gradient_as_bucket_view"])
def test_ddp_with_flat_grads_equals_one_process(bucket_view, tmp_path):
    out = str(tmp_path / "result.pt")
    run_ranks(flat_worker, (2, rendezvous(tmp_path), bucket_view, out), 2, out)
    result = torch.load(out)
    model = make_model()
    train(model, make_opt(model.parameters(), "native"), *data())
    for a, b in zip(result["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    if bucket_view:
        assert result["statuses"][-1].startswith("off: .grad was replaced"), result["statuses"]
    else:
        assert result["statuses"] == ["active"] * STEPS


def refusal_worker(rank, world, init_method, out):
    """fp32_grad_accumulation frees .grad inside backward, before DDP's reduction reads it: it
    must refuse to run in a process group rather than let DDP reduce zeros."""
    model = make_model()
    early = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, loss_scale=None,
                                             fp32_grad_accumulation=True)  # built before the group
    init_group(init_method, rank, world, "gloo")
    messages = []
    try:
        try:
            fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, fp32_grad_accumulation=True)
        except ValueError as exc:
            messages.append(str(exc))
        before = [p.detach().clone() for p in model.parameters()]
        # A plain backward (the early optimizer's hooks accumulate): no DDP reduction is run
        # over grads those hooks free, which left the ranks waiting on each other (flaky hang).
        model(torch.ones(2, 8)).float().sum().backward()
        try:
            early.step()
        except ValueError as exc:
            messages.append(str(exc))
        messages.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
        if rank == 0:
            torch.save(messages, out)
    finally:
        finish_group()


def test_fp32_grad_accumulation_refuses_a_process_group(tmp_path):
    out = str(tmp_path / "messages.pt")
    run_ranks(refusal_worker, (2, rendezvous(tmp_path), out), 2, out)
    construct, step, unchanged = torch.load(out)
    for message in (construct, step):
        assert "single-process only" in message and "DDP" in message
    assert unchanged
