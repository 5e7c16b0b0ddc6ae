"""The FSDP2 row: one optimizer step on a model sharded by `fully_shard` over 2 ranks, ours
against torch.optim on the same shards, in one run.

The model is many small Linear layers (two tensors each, six layers per FSDP unit, as
torchtitan wraps a transformer block of about a dozen tensors), so a step's cost is mostly per-tensor host work: the
number that grows with the shards. Every contender steps FP32 shards and clips by the global
norm first (torch: `clip_grad_norm_`, which reduces over the mesh); ours also steps BF16
shards with FP32 masters (the mixed-precision job). Grads come from one backward (FSDP2's
grad DTensors, values then drawn from N(0, 0.01²)) and are reused by every call, as in the
single-process benchmark.

    python -m fused_opt.bench.fsdp2 [--tensors 1542] [--world 2] [--device cpu] [--record]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch

MAX_NORM = 1.0
WIDTH = 32  # small tensors: the step measures host work, not memory bandwidth
LAYERS_PER_UNIT = 6


def build_model(tensors: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """`tensors` params: Linear(WIDTH, WIDTH) layers with a bias, and one without when odd."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(WIDTH, WIDTH) for _ in range(tensors // 2)]
    if tensors % 2:
        layers.append(torch.nn.Linear(WIDTH, WIDTH, bias=False))
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype)


def shard(model: torch.nn.Module, device: str, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device, (world,))
    layers = list(model)
    for k in range(0, len(layers), LAYERS_PER_UNIT):
        fully_shard(layers[k:k + LAYERS_PER_UNIT], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def contenders(tensors: int, device: str, world: int) -> dict:
    """name -> (step callable, params). The FP32 contenders share one sharded model (each with
    its own optimizer state: timing reads no values), the BF16 one has its own."""
    import fused_opt

    def sharded(dtype):
        model = shard(build_model(tensors, dtype, device), device, world)
        x = torch.randn(4, WIDTH, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))
        model(x).float().square().mean().backward()
        # The backward through hundreds of small layers leaves most grads below 1e-12 and the
        # squares AdamW keeps subnormal, whose arithmetic is several times slower on x86: a
        # trained model's grads are not, so FSDP2's grads get normal values, in place.
        gen = torch.Generator(device).manual_seed(2 + torch.distributed.get_rank())
        with torch.no_grad():
            for p in model.parameters():
                local = p.grad._local_tensor
                local.copy_(torch.randn(local.shape, generator=gen, device=device, dtype=local.dtype) * 1e-2)
        return list(model.parameters())

    def torch_step(opt, params):
        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()
        return step

    made = {}
    fp32, bf16 = sharded(torch.float32), sharded(torch.bfloat16)
    for name, cls, kw in (("torch.optim.AdamW fused", torch.optim.AdamW, dict(lr=1e-3, fused=True)),
                          ("torch.optim.AdamW foreach", torch.optim.AdamW, dict(lr=1e-3, foreach=True)),
                          ("torch.optim.SGD foreach", torch.optim.SGD, dict(lr=1e-2, momentum=0.9, foreach=True))):
        made[name] = (torch_step(cls(fp32, **kw), fp32), fp32)
    for name, cls, kw, params in (
            ("fused_opt AdamW", fused_opt.FusedMixedPrecisionAdamW, dict(lr=1e-3), fp32),
            ("fused_opt SGD", fused_opt.FusedMixedPrecisionSGD, dict(lr=1e-2, momentum=0.9), fp32),
            ("fused_opt AdamW, BF16 shards + FP32 masters", fused_opt.FusedMixedPrecisionAdamW, dict(lr=1e-3), bf16)):
        opt = cls(params, max_grad_norm=MAX_NORM, loss_scale=None, **kw)
        made[name] = (opt.step, params)
    # The same step in one process on plain tensors shaped like this rank's shards: what the
    # sharded step adds is the difference (the all_reduce of the norm included).
    shards = [torch.nn.Parameter(p._local_tensor.detach().clone()) for p in fp32]
    for p, q in zip(shards, fp32):
        p.grad = q.grad._local_tensor.clone()
    opt = fused_opt.FusedMixedPrecisionAdamW(shards, lr=1e-3, max_grad_norm=MAX_NORM, loss_scale=None)
    made[SINGLE] = (opt.step, shards)
    # The one collective our step adds, alone: 2 floats all-reduced over the mesh.
    stats = torch.zeros(2, device=device)
    made[COLLECTIVE] = (lambda: torch.distributed.all_reduce(stats), [])
    return made


SINGLE = "fused_opt AdamW, one process, plain tensors of the shards' sizes"
COLLECTIVE = "all_reduce of 2 floats (the sharded step's one collective)"
# Our sharded step with its all-reduce made a no-op: not a valid step (each rank clips by its
# own norm), timed only to separate the host work sharding adds from the collective's latency.
HOST_ONLY = "fused_opt AdamW, its all-reduce left out (host work only, not a valid step)"


def _worker(rank: int, world: int, address: str, tensors: int, device: str, repeats: int, steps: int,
            out: str) -> None:
    import torch.distributed as dist
    host, port = address.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=300))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    if device == "cuda":
        torch.cuda.set_device(rank)
    try:
        torch.set_num_threads(1)  # the ranks share the machine's cores
        made = contenders(tensors, device, world)
        # Time spent inside our step's all-reduce (waiting for the other ranks included),
        # measured around the call: the rest of the step is this rank's own work.
        from fused_opt import distributed
        reduce, in_collective = distributed.ShardReduction.__call__, [0.0]

        def timed_reduce(self, stats, norm_inf):
            t0 = time.perf_counter()
            try:
                return reduce(self, stats, norm_inf)
            finally:
                in_collective[0] += time.perf_counter() - t0
        distributed.ShardReduction.__call__ = timed_reduce
        made[HOST_ONLY] = (_without_collective(made["fused_opt AdamW"][1], timed_reduce), [])
        times = {name: [] for name in made}
        collective = {name: [] for name in made}
        for name, (fn, _) in made.items():  # warm-up: state allocation, tables, first collectives
            for _ in range(2):
                fn()
        for _ in range(repeats):  # interleaved, every rank in the same order
            for name, (fn, _) in made.items():
                dist.barrier()
                if device == "cuda":
                    torch.cuda.synchronize()
                in_collective[0] = 0.0
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / steps)
                collective[name].append(in_collective[0] / steps)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(dict(times=times, collective=collective), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _without_collective(params: list, reduce):
    """A step of its own AdamW over `params` with ShardReduction a no-op for its duration."""
    import fused_opt
    from fused_opt import distributed
    opt = fused_opt.FusedMixedPrecisionAdamW(params, lr=1e-3, max_grad_norm=MAX_NORM, loss_scale=None)

    def step():
        distributed.ShardReduction.__call__ = lambda self, stats, norm_inf: stats[0]
        try:
            opt.step()
        finally:
            distributed.ShardReduction.__call__ = reduce
    return step


def run(tensors: int = 1542, world: int = 2, device: str = "cpu", repeats: int = 5, steps: int = 5) -> dict:
    """{"rows": [...], ...}: each contender's median step time over the repeats (each repeat the
    mean of `steps` calls on rank 0) and per tensor, and its speedup over torch's fastest AdamW
    (SGD rows: over torch's SGD), from the same run."""
    import torch.distributed as dist
    from .ranks import run_ranks
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=300))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        run_ranks(_worker, (world, f"127.0.0.1:{store.port}", tensors, device, repeats, steps, out), world, out)
        with open(out) as f:
            measured = json.load(f)
    times, collective = measured["times"], measured["collective"]
    median = {name: statistics.median(t) for name, t in times.items()}
    # per repeat: the step's time outside its all-reduce
    outside = {name: statistics.median(t - c for t, c in zip(times[name], collective[name])) for name in times}
    torch_adamw = min(median["torch.optim.AdamW fused"], median["torch.optim.AdamW foreach"])
    rows = []
    for name, t in median.items():
        baseline = median["torch.optim.SGD foreach"] if "SGD" in name else torch_adamw
        ours = name.startswith("fused_opt")
        rows.append(dict(name=name, step_ms=t * 1e3, us_per_tensor=t * 1e6 / tensors if name != COLLECTIVE else None,
                         in_collective_ms=statistics.median(collective[name]) * 1e3 if ours else None,
                         spread=max(times[name]) / min(times[name]) - 1.0,
                         speedup=baseline / t if ours and name != HOST_ONLY else None))
    # What sharding adds to our step over one process on the same shard sizes, with and
    # without the time inside the all-reduce (on gloo a blocking all-reduce across processes,
    # the wait for the slowest rank included; on NCCL enqueued on the stream).
    added = median["fused_opt AdamW"] - median[SINGLE]
    added_outside = outside["fused_opt AdamW"] - outside[SINGLE]
    added_host = median[HOST_ONLY] - median[SINGLE]
    from .__main__ import _commit
    from .timing import device_name
    return dict(tensors=tensors, world=world, device=device, device_name=device_name(torch.device(device)),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, commit=_commit(), width=WIDTH, rows=rows,
                sharding_adds_ms=added * 1e3, sharding_adds_outside_collective_ms=added_outside * 1e3,
                sharding_adds_host_ms=added_host * 1e3)


def table(result: dict) -> str:
    lines = [f"FSDP2, {result['world']} ranks ({result['device']}), {result['tensors']} tensors of "
             f"{result['width']}x{result['width']} / {result['width']}, clip by the global norm + step, 1 thread per rank "
             f"| {result['device_name']} | torch {result['torch']} | {result['date']} | commit {result['commit']}",
             "| contender | step ms | µs per tensor | in the all-reduce ms | spread | vs torch |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        per_tensor = "" if r["us_per_tensor"] is None else f"{r['us_per_tensor']:.2f}"
        collective = "" if r["in_collective_ms"] is None else f"{r['in_collective_ms']:.3f}"
        lines.append(f"| {r['name']} | {r['step_ms']:.3f} | {per_tensor} | {collective} | {r['spread']:.2f} | {speedup} |")
    lines.append(f"Sharding adds {result['sharding_adds_ms']:.3f} ms to our AdamW step over one process on the same "
                 f"shard sizes; outside the all-reduce, {result['sharding_adds_outside_collective_ms'] * 1e3:.0f} µs; "
                 f"with the all-reduce left out (host work), {result['sharding_adds_host_ms'] * 1e3:.0f} µs.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_opt.bench.fsdp2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=1542)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--record", action="store_true",
                        help="run 161 and 1,542 tensors and write bench/results/fsdp2-<device>.{md,json}")
    args = parser.parse_args(argv)
    results = []
    for tensors in (161, 1542) if args.record else (args.tensors,):
        results.append(run(tensors, args.world, args.device, args.repeats, args.steps))
        print(table(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=1)
    if args.record:
        base = os.path.join("bench", "results", f"fsdp2-{args.device}")
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write("\n\n".join(map(table, results)) + "\n")


if __name__ == "__main__":
    main()
