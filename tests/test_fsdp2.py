"""FSDP2 (`fully_shard`, DTensor params), 2 processes on 127.0.0.1 with gloo: the optimizer
steps the local shards, and with clipping active on every step and an inf injected into one
rank's shard only, the gathered params, masters, norms and loss scale equal those of one
process stepping the unsharded model with the same (gathered) grads.

Injecting the inf after the reduce-scatter, into one rank's shard, is what makes the test
bite: without the cross-rank reduction of the inf flag the other rank would apply its step,
and without the reduction of the norm each rank would clip by its own shards' norm."""
import math

import pytest
import torch
import torch.distributed as dist

import fused_opt
from harness import BACKEND_DEVICES
from test_ddp import finish_group, init_group, rendezvous, run_ranks

CPU_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cpu"]
CUDA_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cuda"]
STEPS = 5
INF_STEP = 2
EXPERTS = "hsdp+ep"  # a mesh_shape: params on two meshes (shard)


def make_model(dtype):
    torch.manual_seed(0)
    # Linear(16, 3) and Linear(3, 1) shard unevenly over 2 ranks: rank 1 holds an empty bias shard.
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1)).to(dtype)


def make_opt(model, backend, norm_type, optimizer="sgd", **kw):
    kw.setdefault("ema_decay", 0.8)  # the EMA of sharded masters: a DTensor per param, stepped on the local shard
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if optimizer == "adamw":
        return fused_opt.FusedMixedPrecisionAdamW(
            [dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0, amsgrad=True)],
            lr=1e-2, max_grad_norm=0.05, norm_type=norm_type, init_scale=2.0**8, growth_interval=2,
            loss_scale="dynamic", backend=backend, **kw)
    return fused_opt.FusedMixedPrecisionSGD(
        [dict(params=decay, weight_decay=0.01), dict(params=no_decay, nesterov=True)],
        lr=0.1, momentum=0.9, max_grad_norm=0.05, norm_type=norm_type, init_scale=2.0**8,
        growth_interval=2, loss_scale="dynamic", backend=backend, **kw)


def shard(model, device="cpu", mesh_shape=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if mesh_shape == EXPERTS:  # dense layers on HSDP's 2-D mesh, the last one on a 1-D "expert" mesh
        world = dist.get_world_size()
        dense = init_device_mesh(device, (2, world // 2), mesh_dim_names=("replicate", "shard"))
        experts = init_device_mesh(device, (world,), mesh_dim_names=("ep",))
        linears = [layer for layer in model if isinstance(layer, torch.nn.Linear)]
        for layer in linears[:-1]:
            fully_shard(layer, mesh=dense)
        fully_shard(linears[-1], mesh=experts)
        return model
    # An explicit mesh: fully_shard's default is a CUDA mesh wherever a GPU is present.
    # A 2-D mesh is HSDP: params replicated over dim 0, sharded over dim 1.
    names = ("replicate", "shard") if mesh_shape and len(mesh_shape) == 2 else None
    mesh = init_device_mesh(device, mesh_shape or (dist.get_world_size(),), mesh_dim_names=names)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def worker(rank, world, init_method, backend, dtype, norm_type, device, out, mesh_shape=None, flat=False,
           optimizer="sgd", precision="fp32", master="fp32"):
    init_group(init_method, rank, world, "nccl" if device == "cuda" else "gloo")
    try:
        sharded, replica = shard(make_model(dtype).to(device), device, mesh_shape), make_model(dtype).to(device)
        shards = 2 if mesh_shape == EXPERTS else mesh_shape[-1] if mesh_shape else world
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = make_opt(sharded, backend, norm_type, optimizer, flat_grads=flat, state_precision=precision,
                           master_weights=master)
        flat_warning = [str(w.message) for w in caught if "flat_grads=True" in str(w.message)]
        replica_opt = make_opt(replica, backend, norm_type, optimizer, state_precision=precision,
                               master_weights=master)
        gen = torch.Generator().manual_seed(1)
        records = []
        for step in range(STEPS):
            x = torch.randn(world, 4, 8, generator=gen).to(device, dtype)
            opt.zero_grad()
            opt.scale_loss(sharded(x[rank]).float().square().mean()).backward()
            if step == INF_STEP and rank % shards == shards - 1:  # the last shard (on every replica)
                first = next(p for p in sharded.parameters() if p.grad._local_tensor.numel())
                first.grad._local_tensor.view(-1)[0] = math.inf  # this rank's shard only
            # The replica steps the unsharded model on the gathered (reduced) grads.
            for p, q in zip(sharded.parameters(), replica.parameters()):
                q.grad = p.grad.full_tensor()
            # torch's norm of the same (unscaled) grads
            torch_norm = torch.nn.utils.get_total_norm([q.grad.double() / opt.loss_scale.double()
                                                        for q in replica.parameters()], norm_type)
            replica_opt.scale_loss(torch.zeros(()))
            if device == "cuda" and step > 0:  # after the first step built the tables: no host sync,
                torch.cuda.set_sync_debug_mode("error")  # the NCCL all-reduce included
            opt.step()
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            replica_opt.step()
            records.append([t.clone() for t in (opt.last_grad_norm, replica_opt.last_grad_norm, opt.loss_scale,
                                                replica_opt.loss_scale, opt.last_step_skipped,
                                                replica_opt.last_step_skipped, torch_norm)])
        params = [(p.full_tensor(), q.detach().clone()) for p, q in zip(sharded.parameters(), replica.parameters())]
        masters = [(opt._masters.current_master(opt.state[p], p).full_tensor(),
                    replica_opt._masters.current_master(replica_opt.state[q], q))
                   for p, q in zip(sharded.parameters(), replica.parameters())]
        emas = [(e.full_tensor(), r) for e, r in zip(opt.ema_params(), replica_opt.ema_params())]
        with opt.swap_ema():  # each rank puts its EMA shards into its param shards
            swapped = [p.full_tensor() for g in opt.param_groups for p in g["params"]]  # ema_params' order
        swapped_back = all(torch.equal(p.full_tensor(), q) for p, (q, _) in zip(sharded.parameters(), params))
        keys = (opt._masters.key, *(("exp_avg", "exp_avg_sq") if optimizer == "adamw" else ("momentum_buffer",)))
        kinds = {type(opt.state[p][k]).__name__ for p in sharded.parameters() for k in (*keys, "ema_param")}
        if rank == 0:
            torch.save(dict(records=records, params=params, masters=masters, kinds=kinds, emas=emas,
                            swapped=swapped, swapped_back=swapped_back, flat_status=opt.flat_grads_status, flat_warning=flat_warning), out)
    finally:
        finish_group()


def check(out, quantized=False):
    """quantized: int8 state, whose blocks are per shard in the sharded run and per tensor in
    the replica: the two runs quantize differently, and agree to the codes' resolution."""
    result = torch.load(out)
    assert result["kinds"] == {"DTensor"}  # sharded state: what torch.distributed.checkpoint expects
    skipped = [bool(r[4]) for r in result["records"]]
    assert skipped == [step == INF_STEP for step in range(STEPS)]
    for norm, replica_norm, scale, replica_scale, skip, replica_skip, torch_norm in result["records"]:
        assert bool(skip) == bool(replica_skip) and float(scale) == float(replica_scale)
        if not skip:
            assert 0.05 < float(norm) < math.inf  # clipping was active
            torch.testing.assert_close(norm, replica_norm, rtol=1e-6, atol=0)
            torch.testing.assert_close(norm.double(), torch_norm, rtol=1e-6, atol=0)
    # The norm is summed in another order across ranks: masters agree to FP32 rounding.
    rtol, atol = (1e-2, 1e-3) if quantized else (1e-6, 1e-7)  # (lr 0.1 and 1e-2: a fraction of a step)
    for master, replica_master in result["masters"]:
        torch.testing.assert_close(master.cpu(), replica_master.cpu(), rtol=rtol, atol=atol)
    for param, replica_param in result["params"]:
        torch.testing.assert_close(param.cpu(), replica_param.cpu(), rtol=max(rtol, 1e-3), atol=max(atol, 1e-5))
    for (ema, replica_ema), swapped in zip(result["emas"], result["swapped"]):
        torch.testing.assert_close(ema.cpu(), replica_ema.cpu(), rtol=rtol, atol=atol)
        assert torch.equal(swapped, ema.to(swapped.dtype))
    assert result["swapped_back"]


@pytest.mark.parametrize("dtype,norm_type", [(torch.float16, 2.0), (torch.bfloat16, math.inf)],
                         ids=["fp16-l2", "bf16-inf"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_two_processes_equal_unsharded(backend, dtype, norm_type, tmp_path):
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (2, rendezvous(tmp_path), backend, dtype, norm_type, "cpu", str(out)), 2, str(out))
    check(out)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_int8_state_blocks_per_shard(backend, optimizer, tmp_path):
    # state_precision="int8" on DTensor params: codes sharded like the param, block scales per
    # local shard (a block never spans two ranks)
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (2, rendezvous(tmp_path), backend, torch.bfloat16, 2.0, "cpu", str(out), None, False, optimizer,
                       "int8"), 2, str(out))
    check(out, quantized=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_adamw_two_processes_equal_unsharded(backend, tmp_path):
    # AdamW's moments as DTensors; the empty bias shard on rank 1 counts its steps too.
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (2, rendezvous(tmp_path), backend, torch.bfloat16, 2.0, "cpu", str(out), None, False, "adamw"),
              2, str(out))
    check(out)


@pytest.mark.parametrize("master,precision,optimizer", [("remainder", "fp32", "adamw"), ("remainder", "int8", "sgd"),
                                                       ("remainder8", "bf16", "adamw"), ("remainder8", "int8", "adamw")])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_remainder_masters_equal_unsharded(backend, master, precision, optimizer, tmp_path):
    # BF16 shards keep int16 (int8) remainders sharded like them, uneven last shards and an
    # empty one included, with the EMA and each state precision: the masters equal one process's.
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (2, rendezvous(tmp_path), backend, torch.bfloat16, 2.0, "cpu", out, None, False, optimizer,
                       precision, master), 2, out)
    check(out, quantized=precision == "int8")


def test_fsdp2_with_flat_grads_steps_per_tensor_exactly(tmp_path):
    # FSDP2 makes a new DTensor .grad every step: flat_grads says so and keeps the exact path.
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (2, rendezvous(tmp_path), "native", torch.float16, 2.0, "cpu", str(out), None, True), 2, str(out))
    check(out)
    result = torch.load(out)
    assert result["flat_status"].startswith("off: DTensor")
    # said at construction, not left to be discovered in flat_grads_status
    assert len(result["flat_warning"]) == 1 and "stays off" in result["flat_warning"][0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hsdp_reduces_over_the_shard_dim_only(backend, tmp_path):
    # 4 ranks as 2 replicas x 2 shards: counting the replicated dim too would double the sum
    # of squares (the norm off by sqrt(2)) and clip every step differently.
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (4, rendezvous(tmp_path), backend, torch.float16, 2.0, "cpu", str(out), (2, 2)), 4, str(out))
    check(out)


@pytest.mark.parametrize("backend,norm_type", [(b, 2.0) for b in CPU_BACKENDS] + [("native", math.inf)])
def test_one_norm_over_params_on_two_meshes(backend, norm_type, tmp_path):
    # Dense params on HSDP's 2x2 mesh, the last layer on a 4-rank expert mesh (as torchtitan's
    # MoE models have): one clip by the norm of all of them, as torch's over the same grads,
    # and the inf on one mesh skips the step on both.
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (4, rendezvous(tmp_path), backend, torch.float16, norm_type, "cpu", str(out), EXPERTS), 4,
              str(out))
    check(out)


@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_fsdp2_on_cuda_with_nccl(backend, tmp_path):
    # One GPU here, so one rank: the DTensor path, the kernels on local shards and the NCCL
    # all-reduce between the norm and the clip, on the device.
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (1, rendezvous(tmp_path), backend, torch.float16, 2.0, "cuda", str(out)), 1, str(out))
    check(out)




def equal_on_every_rank(a, b) -> bool:
    """Whether two DTensors sharded alike hold the same bits on every rank (compared shard by
    shard: gloo gathers no int16, the remainders' dtype)."""
    same = torch.tensor([int(torch.equal(a._local_tensor, b._local_tensor))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same)


def checkpoint_worker(rank, world, init_method, backend, path, out, precision="fp32", master="fp32"):
    """A sharded DCP checkpoint (each rank writes its shards of masters and buffers, the scaler
    state rides in the param groups) resumes a fresh sharded model bit-identically."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    init_group(init_method, rank, world, "gloo")
    try:
        def train(model, opt, steps):
            for step in steps:
                x = torch.randn(world, 4, 8, generator=torch.Generator().manual_seed(step)).to(dtype)
                opt.zero_grad()
                opt.scale_loss(model(x[rank]).float().square().mean()).backward()
                if step == INF_STEP and rank == 0:
                    next(model.parameters()).grad._local_tensor.view(-1)[0] = math.inf
                opt.step()

        dtype = torch.float16 if master == "fp32" else torch.bfloat16  # remainders: BF16 params
        model = shard(make_model(dtype))
        try:  # FSDP2 reduce-scatters .grad after the hook would have freed it
            fused_opt.FusedMixedPrecisionSGD(model.parameters(), fp32_grad_accumulation=True)
            refused = False
        except ValueError as exc:
            refused = "DTensor" in str(exc)
        opt = make_opt(model, backend, 2.0, state_precision=precision, master_weights=master)
        train(model, opt, range(3))
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)
        train(model, opt, range(3, 5))

        torch.manual_seed(99)
        model2 = shard(make_model(dtype))
        with torch.no_grad():
            for p in model2.parameters():
                p.add_(1.0)  # different values: all must come from the checkpoint
        opt2 = make_opt(model2, backend, 2.0, state_precision=precision, master_weights=master)
        model_sd, opt_sd = get_state_dict(model2, opt2)
        state = {"model": model_sd, "optim": opt_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train(model2, opt2, range(3, 5))
        same = [torch.equal(p.full_tensor(), q.full_tensor()) for p, q in zip(model.parameters(), model2.parameters())]
        for p, q in zip(model.parameters(), model2.parameters()):
            for key in (opt._masters.key, "momentum_buffer", "ema_param"):
                same.append(equal_on_every_rank(opt.state[p][key], opt2.state[q][key]))
            if precision == "int8":  # saved decoded, re-encoded on load: the same codes and scales
                same.append(torch.equal(opt.state[p]["momentum_buffer_scale"], opt2.state[q]["momentum_buffer_scale"]))
        same.append(torch.equal(opt.loss_scale, opt2.loss_scale))
        if rank == 0:
            torch.save(dict(same=same, scale=float(opt.loss_scale), refused=refused), out)
    finally:
        finish_group()


@pytest.mark.parametrize("precision,master", [("fp32", "fp32"), ("int8", "fp32"), ("bf16", "remainder"),
                                              ("int8", "remainder8")])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_sharded_checkpoint_resumes_bit_identically(backend, precision, master, tmp_path):
    out = str(tmp_path / "result.pt")
    run_ranks(checkpoint_worker, (2, rendezvous(tmp_path), backend, str(tmp_path / "ckpt"), out, precision, master),
              2, str(out))
    result = torch.load(out)
    assert all(result["same"]), result["same"]
    assert result["refused"]  # fp32_grad_accumulation on DTensor params
    assert result["scale"] == 2.0**9  # 2**8 grew at step 1, backed off at the inf, grew again at step 4


REFUSED_ON_SHARDS = {
    "accumulation": lambda p: fused_opt.FusedMixedPrecisionSGD([p], lr=0.1, fp32_grad_accumulation=True),
    "muon": lambda p: fused_opt.FusedMixedPrecisionMuon([p]),
    "musgd": lambda p: fused_opt.FusedMixedPrecisionMuSGD([p]),
}


def shard_refusal_worker(rank, world, init_method, out, case):
    """What is refused at construction on a DTensor param: the message (None if accepted)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    init_group(init_method, rank, world, "gloo")
    try:
        mesh = init_device_mesh("cpu", (world,))
        param = torch.nn.Parameter(distribute_tensor(torch.zeros(8, 4, dtype=torch.bfloat16), mesh, [Shard(0)]))
        try:
            REFUSED_ON_SHARDS[case](param)
            message = None
        except ValueError as exc:
            message = str(exc)
        if rank == 0:
            torch.save(message, out)
    finally:
        finish_group()


@pytest.mark.parametrize("case, expected", [
    ("accumulation", "MixedPrecisionPolicy(reduce_dtype=torch.float32)"),  # what FSDP2 users use instead
    ("muon", "DTensor (FSDP2 / tensor parallel): its local shard is not the matrix"),
    ("musgd", "DTensor (FSDP2 / tensor parallel): its local shard is not the matrix"),
])
def test_refused_on_dtensor_params_with_a_message_that_says_why(tmp_path, case, expected):
    out = str(tmp_path / "message.pt")
    run_ranks(shard_refusal_worker, (2, rendezvous(tmp_path), out, case), 2, out)
    message = torch.load(out)
    assert message is not None and expected in message


def mode_kw(mode: str) -> dict:
    """"int8" or "int8/remainder": state_precision and master_weights."""
    precision, _, master = mode.partition("/")
    return dict(state_precision=precision, master_weights=master or "fp32", ema_decay=None)


def gathered(entry: dict) -> dict:
    """A state entry's full tensors. Remainders are left out (gloo gathers no int16 or int8):
    master_param holds the same masters in FP32."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in entry.items()
            if not (hasattr(v, "full_tensor") and v.dtype in (torch.int16, torch.int8))}


# Modes that are torch's own optimizer on the same params and groups; "sgd:<mode>" is our SGD.
TORCH, TORCH_SGD = "torch.optim.AdamW", "torch.optim.SGD"


def make_optimizer(model, mode):
    """Ours in `mode` (mode_kw; AdamW, or SGD for "sgd:..."), or torch.optim.AdamW / SGD with the
    same groups and hyperparameters."""
    if mode.startswith("sgd:"):
        return make_opt(model, "native", 2.0, optimizer="sgd", **mode_kw(mode[4:]))
    if mode not in (TORCH, TORCH_SGD):
        return make_opt(model, "native", 2.0, optimizer="adamw", **mode_kw(mode))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if mode == TORCH_SGD:
        return torch.optim.SGD([dict(params=decay, weight_decay=0.01), dict(params=no_decay, nesterov=True)],
                               lr=0.1, momentum=0.9, foreach=True)
    return torch.optim.AdamW([dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0,
                                                                          amsgrad=True)], lr=1e-2, foreach=True)


def train_steps(model, opt, steps, world, rank):
    for step in steps:
        x = torch.randn(world, 4, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        opt.zero_grad()
        loss = model(x[rank]).float().square().mean()
        (opt.scale_loss(loss) if hasattr(opt, "scale_loss") else loss).backward()
        opt.step()


def layout_save_worker(rank, world, init_method, path, out, mode):
    """FSDP2 on `world` ranks: AdamW steps, then a DCP checkpoint; rank 0 keeps the full
    (gathered) values the checkpoint holds, for the loader in another layout to compare."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    init_group(init_method, rank, world, "gloo")
    try:
        model = shard(make_model(torch.bfloat16))
        opt = make_optimizer(model, mode)
        train_steps(model, opt, range(3), world, rank)
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)
        full = {fqn: gathered(entry) for fqn, entry in opt_sd["state"].items()}
        if rank == 0:
            torch.save(dict(state=full, scale=float(getattr(opt, "loss_scale", 0)),
                            applied=int(getattr(opt, "_applied_steps", 0))), out)
    finally:
        finish_group()


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "fp32/remainder", "int8/remainder8"])
def test_fsdp2_checkpoint_loads_in_one_process(mode, tmp_path):
    """A checkpoint of FSDP2 shards (2 ranks) loads into the unsharded model and optimizer of
    one process, in the same state precision: FP32 masters exactly, state exactly (int8: to
    its encoding's precision, its blocks now over whole tensors), the loss scale and step
    count; the optimizer then steps. (An int8 checkpoint holding codes and scales would be
    refused by DCP here: the shards' blocks are not the whole tensors' blocks.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path, out = str(tmp_path / "ckpt"), str(tmp_path / "saved.pt")
    run_ranks(layout_save_worker, (2, rendezvous(tmp_path), path, out, mode), 2, out)
    precision = mode_kw(mode)["state_precision"]
    saved = torch.load(out)
    model = make_model(torch.bfloat16)
    opt = make_opt(model, "native", 2.0, optimizer="adamw", **mode_kw(mode))
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert float(opt.loss_scale) == saved["scale"] and int(opt._applied_steps) == saved["applied"]
    mine = opt.state_dict()["state"]
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for group in opt.param_groups for p in group["params"]]  # state_dict's numbering
    for index, name in enumerate(names):
        want, got = saved["state"][name], mine[index]
        assert torch.equal(got["master_param"], want["master_param"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            if precision == "int8":  # re-encoded in whole-tensor blocks: within the encoding's step
                torch.testing.assert_close(got[key].float(), want[key].float(), rtol=0.07, atol=float(
                    want[key].abs().max()) * 2.0**-14, msg=f"{name} {key}")
            else:
                assert torch.equal(got[key], want[key]), (name, key)
    opt.scale_loss(model(torch.randn(4, 8).to(torch.bfloat16)).float().square().mean()).backward()
    opt.step()
    assert not bool(opt.last_step_skipped)


def layout_load_worker(rank, world, init_method, path, out, mode, partial=False):
    """Loads a checkpoint into FSDP2 shards on `world` ranks; rank 0 reports the gathered
    state, the loss scale and the step count, and whether a step then runs. partial: DCP's
    allow_partial_load, for torch.optim's checkpoint (no masters, no loss scale) into ours."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    init_group(init_method, rank, world, "gloo")
    try:
        model = shard(make_model(torch.bfloat16))
        opt = make_optimizer(model, mode)
        if mode in (TORCH, TORCH_SGD):  # torch.optim's state exists after a step (DCP's get_state_dict makes ours)
            train_steps(model, opt, range(1), world, rank)
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd}
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=partial))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        loaded = {fqn: gathered(entry) for fqn, entry in get_state_dict(model, opt)[1]["state"].items()}
        scale, applied = float(getattr(opt, "loss_scale", 0)), int(getattr(opt, "_applied_steps", 0))
        train_steps(model, opt, range(7, 8), world, rank)
        skipped = bool(getattr(opt, "last_step_skipped", False))
        if rank == 0:
            torch.save(dict(state=loaded, scale=scale, applied=applied, skipped=skipped), out)
    finally:
        finish_group()


@pytest.mark.parametrize("mode", ["fp32", "int8", "bf16/remainder", "int8/remainder8"])
def test_one_process_checkpoint_loads_into_fsdp2(mode, tmp_path):
    """The other direction: a checkpoint of one process's unsharded optimizer loads into FSDP2
    shards on 2 ranks (masters exactly, state exactly or to int8's precision in the shards'
    own blocks, scale and step count), and the sharded optimizer steps on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path, out = str(tmp_path / "ckpt"), str(tmp_path / "loaded.pt")
    model = make_model(torch.bfloat16)
    opt = make_opt(model, "native", 2.0, optimizer="adamw", **mode_kw(mode))
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        opt.zero_grad()
        opt.scale_loss(model(x).float().square().mean()).backward()
        opt.step()
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)
    run_ranks(layout_load_worker, (2, rendezvous(tmp_path), path, out, mode), 2, out)
    precision = mode_kw(mode)["state_precision"]
    loaded = torch.load(out)
    assert loaded["scale"] == float(opt.loss_scale) and loaded["applied"] == int(opt._applied_steps)
    assert not loaded["skipped"]
    for fqn, want in opt_sd["state"].items():
        got = loaded["state"][fqn]
        assert torch.equal(got["master_param"], want["master_param"]), fqn
        for key in ("exp_avg", "exp_avg_sq"):
            if precision == "int8":
                torch.testing.assert_close(got[key].float(), want[key].float(), rtol=0.07, atol=float(
                    want[key].abs().max()) * 2.0**-14, msg=f"{fqn} {key}")
            else:
                assert torch.equal(got[key], want[key]), (fqn, key)


def host_work_worker(rank, world, init_method, out):
    """The sharded step's per-tensor host work equals one process's: the Python calls a step
    makes grow with the tensors exactly as they do for plain tensors. And the check behind
    that (a grad on its param's own spec object) still refuses any other grad."""
    import sys
    from torch.distributed.tensor import DTensor, Replicate
    from fused_opt.bench import fsdp2
    init_group(init_method, rank, world, "gloo")
    try:
        def calls_per_step(tensors, sharded):
            model = fsdp2.build_model(tensors, torch.float32, "cpu")
            if sharded:
                model = fsdp2.shard(model, "cpu", world)
            model(torch.ones(2, fsdp2.WIDTH)).square().mean().backward()
            opt = fused_opt.FusedMixedPrecisionAdamW(model.parameters(), max_grad_norm=1.0, loss_scale=None,
                                                     backend="native")
            opt.step()
            opt.step()
            count = [0]

            def profile(frame, event, arg):
                if event in ("call", "c_call"):
                    count[0] += 1
            sys.setprofile(profile)
            opt.step()
            sys.setprofile(None)
            return count[0], model, opt

        growth = {}
        for sharded in (False, True):
            small, _, _ = calls_per_step(12, sharded)
            large, model, opt = calls_per_step(120, sharded)
            growth[sharded] = large - small

        # The fast check refuses what the full one refuses, before anything is written.
        p = next(model.parameters())
        before = p.full_tensor().clone()
        good = p.grad
        refusals = []
        for bad in (torch.ones(p.shape), DTensor.from_local(torch.ones(p.shape), good.device_mesh, [Replicate()],
                                                            run_check=False)):
            p.grad = bad
            try:
                opt.step()
                refusals.append(None)
            except RuntimeError as exc:
                refusals.append(str(exc))
        unchanged = torch.equal(p.full_tensor(), before)
        # A grad laid out like its param on another spec object (made outside FSDP2): stepped.
        p.grad = DTensor.from_local(good._local_tensor.clone(), good.device_mesh, good.placements, run_check=False)
        opt.step()
        stepped = not torch.equal(p.full_tensor(), before)
        if rank == 0:
            torch.save(dict(growth=growth, refusals=refusals, unchanged=unchanged, stepped=stepped), out)
    finally:
        finish_group()


def test_sharded_step_host_work_grows_like_one_process(tmp_path):
    out = str(tmp_path / "result.pt")
    run_ranks(host_work_worker, (2, rendezvous(tmp_path), out), 2, out)
    result = torch.load(out)
    assert result["growth"][True] == result["growth"][False], result["growth"]
    assert all(r is not None and "must be a DTensor with the param's placements" in r for r in result["refusals"])
    assert result["unchanged"] and result["stepped"]


def compare_states(saved: dict, loaded: dict, precision: str, keys=("exp_avg", "exp_avg_sq")) -> None:
    """Full (gathered) state of each param: masters exactly, state exactly or, int8, to the
    encoding's precision (re-encoded in the new layout's blocks)."""
    for fqn, want in saved.items():
        got = loaded[fqn]
        if "master_param" in want and "master_param" in got:
            assert torch.equal(got["master_param"], want["master_param"]), fqn
        for key in keys:
            a, b = got[key].float(), want[key].float()
            if precision == "int8":
                torch.testing.assert_close(a, b, rtol=0.07, atol=float(b.abs().max()) * 2.0**-14, msg=f"{fqn} {key}")
            else:
                assert torch.equal(a, b), (fqn, key)


@pytest.mark.parametrize("mode", ["fp32", "int8/remainder8", "bf16/remainder"])
def test_fsdp2_checkpoint_reshards_from_2_to_4_ranks(mode, tmp_path):
    """k ranks -> m ranks: a checkpoint of FSDP2 shards on 2 ranks loads into shards on 4
    (each rank's shard now a quarter), masters and state as saved, loss scale and step count,
    and the optimizer steps on."""
    path, saved_out, loaded_out = str(tmp_path / "ckpt"), str(tmp_path / "saved.pt"), str(tmp_path / "loaded.pt")
    run_ranks(layout_save_worker, (2, rendezvous(tmp_path), path, saved_out, mode), 2, saved_out)
    run_ranks(layout_load_worker, (4, rendezvous(tmp_path), path, loaded_out, mode), 4, loaded_out)
    saved, loaded = torch.load(saved_out), torch.load(loaded_out)
    assert (loaded["scale"], loaded["applied"]) == (saved["scale"], saved["applied"]) and not loaded["skipped"]
    compare_states(saved["state"], loaded["state"], mode_kw(mode)["state_precision"])


@pytest.mark.parametrize("saver,loader", [(TORCH, "int8/remainder8"), ("bf16/remainder", TORCH),
                                          (TORCH_SGD, "sgd:int8/remainder8"), ("sgd:bf16/remainder", TORCH_SGD)],
                         ids=["adamw-torch-into-ours", "adamw-ours-into-torch", "sgd-torch-into-ours",
                              "sgd-ours-into-torch"])
def test_fsdp2_checkpoints_cross_with_torch_optim(saver, loader, tmp_path):
    """torch.optim.AdamW's and SGD's FSDP2 checkpoints (2 ranks) into ours on 4 ranks, and ours
    into torch's: the moments and momentum as saved (torch keeps them in the params' BF16; ours
    decoded). torch's checkpoint holds no masters or loss scale, so ours loads it partially: the
    masters start from the loaded params."""
    path, saved_out, loaded_out = str(tmp_path / "ckpt"), str(tmp_path / "saved.pt"), str(tmp_path / "loaded.pt")
    run_ranks(layout_save_worker, (2, rendezvous(tmp_path), path, saved_out, saver), 2, saved_out)
    partial = saver in (TORCH, TORCH_SGD)
    run_ranks(layout_load_worker, (4, rendezvous(tmp_path), path, loaded_out, loader, partial), 4, loaded_out)
    saved, loaded = torch.load(saved_out), torch.load(loaded_out)
    assert not loaded["skipped"]
    keys = ("momentum_buffer",) if "SGD" in saver or saver.startswith("sgd:") else ("exp_avg", "exp_avg_sq")
    if loader in (TORCH, TORCH_SGD):  # torch casts loaded state to the param's dtype
        saved = {fqn: {k: v.to(torch.bfloat16) if k in keys else v for k, v in entry.items()}
                 for fqn, entry in saved["state"].items()}
        compare_states(saved, loaded["state"], "bf16", keys)
    else:
        compare_states(saved["state"], loaded["state"], mode_kw(loader[4:] if loader.startswith("sgd:") else loader)[
            "state_precision"], keys)
