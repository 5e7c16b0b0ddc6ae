"""torchtitan's OptimizersContainer and checkpoint format with our optimizers, on FSDP2 shards
over 2 gloo ranks: `FusedOptimizersContainer` builds them from torchtitan's config, its flat
FQN-keyed state dict goes through torch.distributed.checkpoint as torchtitan's checkpointer
sends it (the container as a Stateful), and a resumed run continues bit for bit: the loss
scale and the applied-step count included, which torchtitan's loader restores only from keys
the live param groups have. torch.optim.AdamW's torchtitan checkpoints load into ours, and ours
into torch.optim.AdamW's."""
import math

import pytest
import torch
import torch.distributed as dist

from test_ddp import finish_group, init_group, rendezvous, run_ranks
from test_fsdp2 import make_model, shard

pytest.importorskip("torchtitan.components.optimizer")

PIPELINE = dict(loss_scale="dynamic", init_scale=2.0**8, growth_interval=1, max_grad_norm=0.05, ema_decay=0.9,
                master_weights="remainder", state_precision="int8")


def ours(model):
    from fused_opt.integrations.torchtitan import fused_adamw
    return fused_adamw(lr=1e-2, weight_decay=0.01, **PIPELINE).build(model_parts=[model])


def torch_adamw(model):
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
    config = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="AdamW",
                                       optimizer_kwargs=dict(lr=1e-2, weight_decay=0.01))],
        implementation="foreach")
    return config.build(model_parts=[model])


def train(model, container, steps, world, rank):
    from fused_opt.integrations import unwrap
    for step in steps:
        x = torch.randn(world, 4, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        container.zero_grad()
        loss = model(x[rank]).float().square().mean()
        opt = unwrap(container.optimizers[0])
        (opt.scale_loss(loss) if opt is not None else loss).backward()
        if step == 2 and rank == 1 and opt is not None:  # one overflow: the scale backs off once
            next(p for p in model.parameters() if p.grad._local_tensor.numel()).grad._local_tensor.view(-1)[0] = math.inf
        container.step()


def save(path, model, container):
    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model.state_dict(), "optimizer": container}, checkpoint_id=path)


def load(path, model, container, partial=False):
    """partial: what the checkpoint lacks keeps its value (DCP's allow_partial_load), as loading
    torch.optim's checkpoint into ours needs: it has no masters, EMA or loss scale."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    state = {"model": model.state_dict(), "optimizer": container}  # the container loads itself (Stateful)
    dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=partial))
    model.load_state_dict(state["model"])


def checkpointer(folder, model, container):
    """torchtitan's own CheckpointManager over the model and the container (no dataloader or
    lr scheduler: their state is not ours)."""
    from torchtitan.components.checkpoint import CheckpointManager
    config = CheckpointManager.Config(enable=True, folder="checkpoint", interval=1)
    return CheckpointManager(config, dataloader=None, model_parts=[model], optimizers=container, lr_schedulers=None,
                             states={}, sd_adapter=None, base_folder=folder)


def fresh_model():
    model = shard(make_model(torch.bfloat16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # other values: all must come from the checkpoint
    return model


def local_state(container, key):
    """This rank's shard of state `key` of every param, as the optimizer's state_dict holds it
    (ours: int8 state decoded)."""
    state = container.optimizers[0].state_dict()["state"]
    return [state[i][key]._local_tensor.float() for i in sorted(state)]


def worker(rank, world, init_method, tmp, out):
    init_group(init_method, rank, world, "gloo")
    try:
        result = {}
        # 1. ours through torchtitan's container and flat checkpoint: a resume continues bit for bit
        model = shard(make_model(torch.bfloat16))
        container = ours(model)
        opt = container.optimizers[0]
        result["kind"] = type(opt).__name__
        train(model, container, range(4), world, rank)
        saved_scale, saved_applied = float(opt.loss_scale), int(opt._applied_steps)
        checkpointer(f"{tmp}/titan", model, container).save(curr_step=4)
        save(f"{tmp}/ours", model, container)
        train(model, container, range(4, 6), world, rank)

        model2 = fresh_model()
        container2 = ours(model2)
        assert checkpointer(f"{tmp}/titan", model2, container2).load(step=4)
        opt2 = container2.optimizers[0]
        result["restored"] = (float(opt2.loss_scale), int(opt2._applied_steps), saved_scale, saved_applied)
        train(model2, container2, range(4, 6), world, rank)
        same = [torch.equal(p._local_tensor, q._local_tensor) for p, q in zip(model.parameters(), model2.parameters())]
        for p, q in zip(model.parameters(), model2.parameters()):
            for key in ("master_remainder", "exp_avg", "exp_avg_sq", "ema_param", "step"):
                a, b = opt.state[p][key], opt2.state[q][key]
                same.append(torch.equal(getattr(a, "_local_tensor", a), getattr(b, "_local_tensor", b)))
        same += [torch.equal(opt.loss_scale, opt2.loss_scale), torch.equal(opt._applied_steps, opt2._applied_steps)]
        flags = torch.tensor([int(all(same))])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        result["resumed_bit_identically"] = bool(flags)

        # 2. torch.optim.AdamW's torchtitan checkpoint into ours: its moments, each param's step
        model3 = shard(make_model(torch.bfloat16))
        theirs = torch_adamw(model3)
        train(model3, theirs, range(3), world, rank)
        save(f"{tmp}/torch", model3, theirs)
        model4 = fresh_model()
        container4 = ours(model4)
        load(f"{tmp}/torch", model4, container4, partial=True)
        # int8 state: loaded values re-encoded, within the encoding's step of torch's
        result["torch_into_ours_close"] = all(
            a.numel() == 0 or torch.allclose(a.float(), b, rtol=0.07, atol=float(a.abs().max()) * 2.0**-14)
            for key in ("exp_avg", "exp_avg_sq")
            for a, b in zip(local_state(theirs, key), local_state(container4, key)))
        train(model4, container4, range(3, 4), world, rank)
        result["steps_after_torch"] = not bool(container4.optimizers[0].last_step_skipped)

        # 3. ours into torch.optim.AdamW's container
        model5 = fresh_model()
        theirs5 = torch_adamw(model5)
        load(f"{tmp}/ours", model5, theirs5)
        ours_saved = ours(shard(make_model(torch.bfloat16)))
        load(f"{tmp}/ours", shard(make_model(torch.bfloat16)), ours_saved)
        # torch keeps its moments in the params' dtype (BF16): ours, decoded, rounded to it
        result["ours_into_torch"] = all(
            torch.equal(a.to(torch.bfloat16).float(), b) for key in ("exp_avg", "exp_avg_sq")
            for a, b in zip(local_state(ours_saved, key), local_state(theirs5, key)))
        train(model5, theirs5, range(3, 4), world, rank)
        if rank == 0:
            torch.save(result, out)
    finally:
        finish_group()


def test_torchtitan_container_checkpoints_resume_and_cross_with_torch_adamw(tmp_path):
    out = str(tmp_path / "result.pt")
    run_ranks(worker, (2, rendezvous(tmp_path), str(tmp_path), out), 2, out)
    result = torch.load(out)
    assert result["kind"] == "FusedMixedPrecisionAdamW"
    scale, applied, saved_scale, saved_applied = result["restored"]
    assert (scale, applied) == (saved_scale, saved_applied) and saved_applied == 3  # 4 steps, one skipped
    assert saved_scale == 2.0**8 * 2 * 2 / 2 * 2  # grew, grew, backed off at the inf, grew
    assert result["resumed_bit_identically"]
    assert result["torch_into_ours_close"] and result["steps_after_torch"]
    assert result["ours_into_torch"]


def torchrun(workdir, mode, *args):
    """tests/torchtitan_cpu_trainer.py on 2 gloo ranks, as a user starts torchtitan."""
    import json
    import os
    import subprocess
    import sys
    out = os.path.join(workdir, f"{mode}{''.join(args)}.json")
    trainer = os.path.join(os.path.dirname(__file__), "torchtitan_cpu_trainer.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          trainer, workdir, mode, out, *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    with open(out) as f:
        result = json.load(f)
    result["losses"] = {int(step): loss for step, loss in result["losses"].items()}
    return result


def test_torchtitan_trainer_trains_and_resumes_with_ours_on_cpu_ranks(tmp_path):
    """torchtitan's Trainer with its llama3 debug model (vocabulary cut to the test tokenizer's),
    FSDP2 over 2 ranks, 6 steps: ours in place of its AdamW gives its losses to 4 digits; the
    documented recipe (BF16 shards, remainder8 masters, int8 state, the clip in our step, an EMA)
    stays within 0.2 % of them, and torchtitan's checkpointer resumes it bit for bit, the
    applied-step count included."""
    from torchtitan_cpu_trainer import make_assets
    workdir = str(tmp_path)
    make_assets(workdir)
    theirs = torchrun(workdir, "torch")
    ours = torchrun(workdir, "ours")
    assert (theirs["kind"], ours["kind"]) == ("AdamW", "FusedMixedPrecisionAdamW")
    assert sorted(theirs["losses"]) == sorted(ours["losses"]) == list(range(1, 7))
    assert theirs["losses"][6] < theirs["losses"][1] - 0.5  # it trains
    for step, loss in theirs["losses"].items():
        assert ours["losses"][step] == pytest.approx(loss, rel=1e-4), step

    recipe = torchrun(workdir, "recipe", "--save-every", "3")
    assert recipe["param_dtype"] == "torch.bfloat16" and recipe["applied_steps"] == 6
    for step, loss in theirs["losses"].items():
        assert recipe["losses"][step] == pytest.approx(loss, rel=2e-3), step
    resumed = torchrun(workdir, "recipe", "--load-step", "3")
    assert resumed["losses"] == {step: recipe["losses"][step] for step in (4, 5, 6)}
    assert resumed["applied_steps"] == 6  # 3 restored + 3
    assert resumed["digest"] == recipe["digest"]  # every rank's shards, masters, int8 state and EMA
