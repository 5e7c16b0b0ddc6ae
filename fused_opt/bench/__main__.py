"""python -m fused_opt.bench [--device cpu|cuda] [--optimizers sgd adamw] [--dtypes fp16 bf16 fp32] [--full] [--train] [--quick] [--record]

Times one optimizer step (SGD with momentum, and AdamW) of every available fused_opt backend
and mode and of the torch.optim pipelines that do the same job, on the same model, in one
run: FP16/BF16 params on FP32 masters, and FP32 params (the autocast loop) with and without a
model EMA. Each torch pipeline is timed alone; then each of ours is timed paired with the
fastest torch pipeline of its job, round by round, so every ratio comes from two contenders
that ran back to back. Contenders are built and freed
one at a time (at most two hold state at once), so the default run fits a machine with 8 GB.

Rows are printed as they finish; the report then starts with a summary (the best of ours per
workload against the best torch pipeline) and is written with a JSON record and a plot to
--out (default `bench-out/`, untracked); --record writes to bench/results/ instead, to commit.
The default is a representative subset (a small and a large sweep point, ResNet-50, GPT-2
small, 161 and 10,000 tensors of 8 elements), then Muon and MuSGD beside torch's (muon.py;
--muon-only for those alone), then the step on FSDP2 shards over 2 processes against torch.optim
on the same shards (fsdp2.py); --full runs the whole size sweep. --train
times whole training iterations instead (fused_opt/bench/train.py)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys

import torch

import fused_opt
from . import workloads
from . import peers
from .contenders import BOUND, BOUND_FP32, Model, factories, job_bytes, representative
from .plot import plot
from .timing import (NOISY_SPREAD, copy_bandwidth, device_name, kernel_launches, paired_ratio, spread,
                     time_interleaved)

RECORD_DIR = os.path.join("bench", "results")


def fp32_plan(device: torch.device, quick: bool, full: bool = False) -> list[tuple[str, list]]:
    """FP32 params (the autocast loop, with and without an EMA): a large sweep point and the
    models SGD and AdamW users train with FP32 weights (ResNet-50 alone by default)."""
    if quick:
        return [("sweep 64K", workloads.sweep(2**16, 8))]
    if not full:
        return [("ResNet-50", workloads.resnet50())]
    large = 2**28 if device.type == "cuda" else 2**24
    return [(f"sweep {large / 2**20:.0f}M", workloads.sweep(large)), ("ResNet-50", workloads.resnet50()),
            ("detector 68M", workloads.detector()), ("GPT-2 small", workloads.gpt2())]


def plan(device: torch.device, quick: bool, full: bool = False) -> list[tuple[str, list]]:
    if quick:
        return [("sweep 64K", workloads.sweep(2**16, 8)), ("many small x200", workloads.many_small(200, 64))]
    if not full:  # the main job: bandwidth-bound, a real model, host-bound
        large = 2**28 if device.type == "cuda" else 2**24
        gpt = [("GPT-2 small", workloads.gpt2())] if device.type == "cuda" else []
        return [(f"sweep {large / 2**20:.0f}M", workloads.sweep(large)), ("ResNet-50", workloads.resnet50()), *gpt,
                ("10,000 x 8", workloads.many_small(10_000, 8))]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # about 120 B/param live at once: each contender's params and state (ours 10 B, a torch
        # pipeline 14 B), the shared grads, and the oracle's temporaries
        largest = 2 ** min(30, int(free * 0.8 / 120).bit_length() - 1)
        sizes = [2**p for p in range(20, 31, 2) if 2**p <= largest]
        return ([(f"sweep {n / 2**20:.0f}M", workloads.sweep(n)) for n in sizes]
                + [("ResNet-50", workloads.resnet50()), ("GPT-2 small", workloads.gpt2()),
                   ("GPT-2 medium", workloads.gpt2(24, 1024)), ("10,000 small", workloads.many_small())])
    return ([(f"sweep {n / 2**20:.0f}M", workloads.sweep(n)) for n in (2**20, 2**22, 2**24)]
            + [("ResNet-50", workloads.resnet50()), ("GPT-2 small", workloads.gpt2()),
               ("10,000 small", workloads.many_small()), ("10,000 x 8", workloads.many_small(10_000, 8))])


def run(args, emit=print) -> dict:
    device = torch.device(args.device)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    # 256 MB: past every CPU cache too (a 32 MB copy ran partly in L3 and read low against the workloads)
    copy_bps = copy_bandwidth(device, 2**25 if args.quick else 2**28)
    rows = []
    jobs = [(w, s, d, o) for o in args.optimizers for w, s in plan(device, args.quick, args.full) for d in args.dtypes
            if d != "fp32" and (args.only is None or args.only in w)]
    if "fp32" in args.dtypes:
        jobs += [(w, s, "fp32", o) for o in args.optimizers for w, s in fp32_plan(device, args.quick, args.full)
                 if args.only is None or args.only in w]
    # torch.compile recompiles per shape list (tens of seconds each): it runs on the largest
    # sweep's FP16 row, where the bandwidth claim is made.
    compile_row = max(((workloads.numel(s), w) for w, s, _, _ in jobs if w.startswith("sweep")), default=(0, None))[1]
    timing = dict(device=device, repeats=args.repeats, steps=args.steps)
    peer_rows = []
    for k, (workload, shapes, dtype_name, optimizer) in enumerate(jobs, 1):
        n = workloads.numel(shapes)
        emit(f"[{k}/{len(jobs)}] {optimizer} {workload} {dtype_name}: {n / 1e6:.1f}M params, {len(shapes)} tensors")
        model = Model(shapes, dtypes[dtype_name], device)
        compiled = args.compile and workload == compile_row and dtype_name == "fp16"
        baselines, ours = factories(model, device, compiled, optimizer)
        if args.peers_only:
            baselines, ours = {}, {}
        elif not (args.full or args.quick):
            baselines, ours = representative(baselines), representative(ours)
        base = dict(workload=workload, optimizer=optimizer, dtype=dtype_name, params=n, tensors=len(shapes))
        # 1. each torch pipeline alone
        solo, jobs_of = {}, {}
        for name, build in baselines.items():
            contender = build()
            solo[name] = _time(contender, name, **timing)
            solo[name]["launches"] = kernel_launches(contender.step, device)
            solo[name]["memory"] = contender.memory_per_param() if hasattr(contender, "memory_per_param") else None
            jobs_of[name] = contender.job
            del contender
            release(device)
        # per job, the fastest torch pipeline that does it (the compiled one pays its compile
        # time elsewhere; GradScaler on FP32 params beside 16-bit ones does another job)
        best_of = {}
        for name in solo:
            if " compiled" not in name and jobs_of[name] != "FP32 params":
                best = best_of.get(jobs_of[name])
                if best is None or solo[name]["median_s"] < solo[best]["median_s"]:
                    best_of[jobs_of[name]] = name
        for name, t in solo.items():  # timed alone: no paired ratio
            job = jobs_of[name]
            best_name = best_of.get(job, best_of["step"])
            rows.append(_row(dict(base, job=job), name, t, solo[best_name], None, copy_bps,
                             _job_bytes(optimizer, dtypes[dtype_name], name), None, paired=False, memory=t["memory"]))
            emit(_line(rows[-1]))
        # 2. each of ours, paired round by round with the best torch pipeline of its job
        default_ms, held = None, (None, None)
        for name, build in ours.items():
            contender = build()
            best_name = best_of[contender.job]
            if held[0] != best_name:
                held = (None, None)
                release(device)
                held = (best_name, baselines[best_name]())
            pair = _time_pair(held[1], best_name, contender, name, **timing)
            launches = kernel_launches(contender.step, device)
            row = _row(dict(base, job=contender.job), name, pair[name], pair[best_name], default_ms, copy_bps,
                       getattr(contender, "bytes_per_param", BOUND[optimizer]), launches,
                       memory=contender.memory_per_param() if hasattr(contender, "memory_per_param") else None)
            if default_ms is None and "[" in name and name.endswith("]") and "torch]" not in name:
                default_ms = row["time_ms"]
            rows.append(row)
            emit(_line(row))
            del contender
            release(device)
        del held, baselines, ours
        release(device)
        # The default run pairs its peers on the sweep alone (torchao compiles a step per shape:
        # ResNet-50's take minutes); --peers-only and --full pair every peer on every workload.
        every = args.full or args.peers_only
        if dtype_name == "bf16" and args.peers and (every or workload.startswith("sweep")):
            peer_rows += run_peers(model, base, device, timing, every, emit)
        del model
        release(device)
    return {
        "device": device_name(device), "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _triton_version(),
        "fused_opt": fused_opt.build_info(), "commit": _commit(), "copy_gb_s": copy_bps / 1e9,
        "bytes_per_param": BOUND, "bytes_per_param_fp32": BOUND_FP32, "repeats": args.repeats, "steps_per_repeat": args.steps,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rows": rows, "peers": peer_rows,
        "peer_versions": {p.package: peers.version(p.package) for p in peers.PEERS},
    }


def run_peers(model, base, device, timing, every: bool, emit=print) -> list:
    """Each peer of this optimizer (peers.py), timed paired with the configuration of ours that
    stores the same kind of thing, or listed with why it did not run."""
    rows = []
    for peer in peers.selected(base["optimizer"], every):
        row = dict(base, contender=peer.name, package=peer.package, version=peers.version(peer.package),
                   stores=peer.stores, lacks=peer.lacks)
        reason = peers.why_not(peer, device, base["tensors"])
        if reason is not None:
            rows.append(dict(row, skipped=reason))
            emit(f"    {peer.name:<48} skipped: {reason}")
            continue
        try:  # a peer built for another torch (the GPU machine's) may fail where it imports or steps
            contender = peers.PeerContender(model, peer)
            contender.step()
        except Exception as error:  # noqa: BLE001 - any failure of another library's code is reported, not raised
            reason = f"failed here: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            rows.append(dict(row, skipped=reason))
            emit(f"    {peer.name:<48} {reason}")
            release(device)
            continue
        ours = peers.paired_ours(model, peer)
        pair = _time_pair(ours, ours.name, contender, peer.name, **timing)
        mine, theirs = pair[ours.name], pair[peer.name]
        grad_bytes = model.grads[0].element_size()
        held, ours_held = contender.memory_per_param(), ours.memory_per_param()
        rounds = [t / o for o, t in zip(mine["samples"], theirs["samples"], strict=True)]
        rows.append(dict(
            row, ours=ours.name, time_ms=theirs["median_s"] * 1e3, ours_ms=mine["median_s"] * 1e3,
            first_ms=theirs["first_s"] * 1e3, host_ms=None if theirs["host_s"] is None else theirs["host_s"] * 1e3,
            ours_host_ms=None if mine["host_s"] is None else mine["host_s"] * 1e3,
            ours_faster=paired_ratio(theirs, mine), spread=spread(rounds),
            noisy=spread(rounds) > NOISY_SPREAD, held=held, ours_held=ours_held,
            moved=peers.moved_bytes(held, grad_bytes), ours_moved=peers.moved_bytes(ours_held, grad_bytes),
            launches=kernel_launches(contender.step, device), ours_launches=kernel_launches(ours.step, device),
            host_ops=peers.host_ops(contender.step), ours_host_ops=peers.host_ops(ours.step)))
        r = rows[-1]
        emit(f"    {peer.name:<48} {r['time_ms']:9.3f} ms, {held:.2f} B/param; {ours.name} {r['ours_ms']:.3f} ms, "
             f"{ours_held:.2f} B/param: ours {r['ours_faster']:.2f}x (spread {r['spread']:.0%})")
        del contender, ours
        release(device)
    return rows


def equal_bytes(record: dict) -> list:
    """Each BF16 row of ours on a workload the peers ran, against the fastest peer there that
    holds as few bytes per param or fewer (same run, not paired: each was timed in its own pair)."""
    ran = [r for r in record.get("peers") or [] if not r.get("skipped")]
    out = []
    for r in record["rows"]:
        if not (r["contender"].startswith("fused_opt[") and "torch]" not in r["contender"] and r["dtype"] == "bf16"
                and r.get("memory_per_param")):
            continue
        rivals = [p for p in ran if (p["optimizer"], p["workload"]) == (r["optimizer"], r["workload"])
                  and p["held"] <= r["memory_per_param"] + 1e-9]
        if rivals:
            best = min(rivals, key=lambda p: p["time_ms"])
            out.append(dict(optimizer=r["optimizer"], workload=r["workload"], ours=r["contender"], ours_ms=r["time_ms"],
                            ours_held=r["memory_per_param"], peer=best["contender"], peer_ms=best["time_ms"],
                            peer_held=best["held"], ours_faster=best["time_ms"] / r["time_ms"]))
    return out


def peer_table(record: dict) -> str:
    """The peers beside the configuration of ours that stores the same kind of thing."""
    rows = record.get("peers") or []
    if not rows:
        return ""
    lines = ["Peers (BF16 params; each timed paired with the configuration of ours that stores the same kind of "
             "thing; B/param held measured from the storages; moved: held read and written once + grads read twice; "
             "ops: top-level torch ops per step on the host)", "",
             "| optimizer | workload | tensors | peer | version | ms/step | first ms | held B/param | moved B/param "
             "| ops | ours | ms/step | held B/param | moved B/param | ops | ours faster (paired) | the peer does not do |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['optimizer']} | {r['workload']} | {r['tensors']} | {r['contender']} | {r['version'] or '-'} "
        if r.get("skipped"):
            lines.append(head + f"| skipped: {r['skipped']} |" + " |" * 11)
            continue
        lines.append(head + f"| {r['time_ms']:.3f}{' !' if r['noisy'] else ''} | {r['first_ms']:.0f} | {r['held']:.2f} "
                     f"| {r['moved']:.1f} | {r['host_ops']} | {r['ours']} | {r['ours_ms']:.3f} | {r['ours_held']:.2f} "
                     f"| {r['ours_moved']:.1f} | {r['ours_host_ops']} | {r['ours_faster']:.2f}x | {r['lacks']} |")
    pairs = equal_bytes(record)
    if pairs:
        lines += ["", "Each of our BF16 rows against the fastest peer that holds as few bytes per param or fewer "
                  "(same run; each timed in its own pair)", "",
                  "| optimizer | workload | ours | ms/step | held B/param | fastest peer at <= bytes | ms/step "
                  "| held B/param | ours faster |", "|---|---|---|---|---|---|---|---|---|"]
        for e in pairs:
            lines.append(f"| {e['optimizer']} | {e['workload']} | {e['ours']} | {e['ours_ms']:.3f} | {e['ours_held']:.2f} "
                         f"| {e['peer']} | {e['peer_ms']:.3f} | {e['peer_held']:.2f} | {e['ours_faster']:.2f}x |")
    return "\n".join(lines)


def release(device: torch.device) -> None:
    """Gives a freed contender's memory back: reference cycles collected now, the CUDA cache
    emptied, and on glibc the heap trimmed (its dynamic mmap threshold serves large tensors
    from the heap after the first is freed, and a heap keeps what it once held)."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _time(contender, name, device, repeats, steps) -> dict:
    clock = getattr(contender, "kernel_clock", None)
    return time_interleaved({name: contender.step}, device, repeats=repeats, steps=steps, clocks={name: clock})[name]


def _time_pair(best, best_name, contender, name, device, repeats, steps) -> dict:
    clocks = {best_name: getattr(best, "kernel_clock", None), name: getattr(contender, "kernel_clock", None)}
    return time_interleaved({best_name: best.step, name: contender.step}, device, repeats=repeats, steps=steps,
                            clocks=clocks)


def _job_bytes(optimizer: str, dtype: torch.dtype, name: str) -> int:
    """A torch pipeline's B/param moved, counted as the job's least (what ours moves for it)."""
    return job_bytes(optimizer, dtype, torch.float32 if name.endswith("+ EMA") else None)


def _row(base, name, t, best, default_ms, copy_bps, bytes_per_param, launches, memory=None, paired=True) -> dict:
    n = base["params"]
    bandwidth = bytes_per_param * n / t["median_s"]
    noisy = None
    if paired:  # the spread of the rounds' ratios, each from two contenders run back to back
        rounds = [b / c for b, c in zip(best["samples"], t["samples"], strict=True)]
        noise = spread(rounds)
        if noise > NOISY_SPREAD:
            noisy = f"the rounds' ratios run from {min(rounds):.2f}x to {max(rounds):.2f}x"
    else:
        noise = spread(t["samples"])
        if noise > NOISY_SPREAD:
            noisy = f"the slowest repeat took {noise:.0%} longer than the fastest"
    paired = paired_ratio(best, t) if paired else None
    return dict(base, spread=noise, noisy=noisy, over_copy=bandwidth > copy_bps, contender=name,
                time_ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3, max_ms=t["max_s"] * 1e3,
                host_ms=None if t["host_s"] is None else t["host_s"] * 1e3, first_ms=t["first_s"] * 1e3,
                gb_s=bandwidth / 1e9, copy_fraction=bandwidth / copy_bps,
                speedup_vs_best_torch=best["median_s"] / t["median_s"], speedup_vs_best_torch_paired=paired,
                launches=launches if launches is not None else t.get("launches"),
                samples_ms=[x * 1e3 for x in t["samples"]], bytes_per_param=bytes_per_param,
                speedup_vs_fused_opt=None if default_ms is None else default_ms / (t["median_s"] * 1e3),
                memory_per_param=memory)


def _line(r: dict) -> str:
    host = "" if r["host_ms"] is None else f" (host {r['host_ms']:.3f})"
    paired = "" if r["speedup_vs_best_torch_paired"] is None else f", paired {r['speedup_vs_best_torch_paired']:.2f}x"
    flag = (f"  ! {r['noisy']}" if r.get("noisy") else "") + ("  ? faster than the copy" if r.get("over_copy") else "")
    return (f"    {r['contender']:<48} {r['time_ms']:9.3f} ms{host}  {r['speedup_vs_best_torch']:.2f}x best torch{paired}"
            f" (spread {r['spread']:.0%}){flag}")


def summary(record: dict) -> str:
    """Per optimizer, workload, dtype and job: the fastest of ours against the fastest torch pipeline."""
    lines = ["| optimizer | workload | dtype | job | params / tensors | fastest fused_opt | ms/step | best torch | ms/step | speedup (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def key(r):
        return r.get("optimizer", "sgd"), r["workload"], r["dtype"], r.get("job", "step")
    for k in dict.fromkeys(map(key, record["rows"])):
        optimizer, workload, dtype, job = k
        rows = [r for r in record["rows"] if key(r) == k]
        ours = [r for r in rows if r["contender"].startswith("fused_opt") and "torch]" not in r["contender"]]
        theirs = [r for r in rows if not r["contender"].startswith("fused_opt") and " compiled" not in r["contender"]]
        if not ours or not theirs:
            continue
        best_ours = min(ours, key=lambda r: r["time_ms"])
        best_torch = min(theirs, key=lambda r: r["time_ms"])
        mark = " !" if best_ours.get("noisy") or best_torch.get("noisy") else ""
        lines.append(f"| {optimizer} | {workload} | {dtype} | {job} | {best_ours['params'] / 1e6:.1f}M / {best_ours['tensors']} "
                     f"| {best_ours['contender']} | {best_ours['time_ms']:.3f} | {best_torch['contender']} "
                     f"| {best_torch['time_ms']:.3f} | {_ratio(best_ours['speedup_vs_best_torch_paired'])}{mark} |")
    return "\n".join(lines) + noise_note(record)


def noise_note(record: dict) -> str:
    """What the marks mean, and how many rows carry them, said once under the summary."""
    rows = record["rows"]
    noisy = [r for r in rows if r.get("noisy")]
    over = [r for r in rows if r.get("over_copy")]
    lines = [f"Spread: max/min - 1 of the repeats (for rows of ours, of the rounds' paired ratios). "
             f"{len(noisy)} of {len(rows)} rows are marked ! (spread over {NOISY_SPREAD:.0%}): their ratio is "
             "not meaningful; the machine was busy, rerun them on a quiet one."]
    if noisy:
        lines.append(f"For example {noisy[0]['contender']} on {noisy[0]['workload']} {noisy[0]['dtype']}: "
                     f"{noisy[0]['noisy']}.")
    if over:
        lines.append(f"{len(over)} rows are marked ? in % copy: they moved their bytes faster than the copy "
                     f"measured at the start ({record['copy_gb_s']:.1f} GB/s), so that copy ran slow (or the "
                     "bytes stayed in a cache): their % of copy overstates.")
    return "\n\n" + " ".join(lines)


def _commit() -> str:
    """The commit of the code that ran: the clone's HEAD when this file is tracked in one
    (with "+dirty" for uncommitted edits), else what the build recorded (an install from a
    clone), else said to be unknown."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", os.path.basename(__file__)], cwd=here,
                                 capture_output=True, text=True, timeout=10).returncode == 0
        if tracked:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                  cwd=here).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=here).stdout.strip()
            if head:
                return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    built = fused_opt.build_info().get("commit")
    if built:
        return f"{built[:7]}{'+dirty' if built.endswith('+dirty') else ''} (as built)"
    return "unknown (not run from a git clone, and the build recorded none)"


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def table(record: dict) -> str:
    head = (f"Device: {record['device']} | torch {record['torch']} | {record['date']} | commit {record.get('commit')} | "
            f"copy {record['copy_gb_s']:.1f} GB/s (read+write)")
    if not record["rows"]:  # --peers-only, --muon-only
        if record.get("muon"):
            from .muon import muon_table
            return head + "\n\n" + muon_table(record["muon"])
        return head + "\n\n" + peer_table(record)
    lines = [head, "", summary(record), "",
             "| optimizer | workload | dtype | params | tensors | contender | ms/step | spread | host ms | first ms | B/param moved | GB/s | % copy | vs best torch | paired | vs fused_opt default | memory B/param | launches |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r.get('optimizer', 'sgd')} | {r['workload']} | {r['dtype']} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['contender']} "
                     f"| {r['time_ms']:.3f} | {r['spread']:.0%}{' !' if r.get('noisy') else ''} | {_ms(r['host_ms'])} "
                     f"| {r['first_ms']:.1f} | {r['bytes_per_param']:g} "
                     f"| {r['gb_s']:.1f} | {100 * r['copy_fraction']:.0f}%{' ?' if r.get('over_copy') else ''} "
                     f"| {r['speedup_vs_best_torch']:.2f}x "
                     f"| {_ratio(r.get('speedup_vs_best_torch_paired'))} "
                     f"| {_ratio(r['speedup_vs_fused_opt'])} | {_ratio(r['memory_per_param'], '')} "
                     f"| {r['launches'] if r['launches'] is not None else '-'} |")
    if record.get("peers"):
        lines += ["", peer_table(record)]
    if record.get("muon"):
        from .muon import muon_table
        lines += ["", "Muon and MuSGD, BF16 params:", "", muon_table(record["muon"])]
    if record.get("fsdp2"):
        from . import fsdp2
        lines += ["", *(fsdp2.table(result) + "\n" for result in record["fsdp2"])]
    return "\n".join(lines).rstrip("\n")


# FSDP2 rows: 161 tensors (ResNet-50's count) by default; --full adds 1,542. torch's first
# steps on that many DTensors take about a minute on 2 CPU cores (sharding propagation).
FSDP2_TENSORS = (161,)
FSDP2_TENSORS_FULL = (161, 1542)


def run_fsdp2(args, emit=print) -> list:
    from . import fsdp2
    device = args.device
    world = 2 if device == "cpu" else max(1, min(2, torch.cuda.device_count()))
    results = []
    for tensors in (7,) if args.quick else FSDP2_TENSORS_FULL if args.full else FSDP2_TENSORS:
        emit(f"FSDP2, {world} ranks: {tensors} tensors")
        results.append(fsdp2.run(tensors, world, device, repeats=args.repeats, steps=args.steps))
        emit(fsdp2.table(results[-1]))
    return results


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(value, unit="x") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_opt.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=["fp16", "bf16", "fp32"],
                        help="param dtypes; fp32 is the autocast loop (its own workloads, with and without an EMA)")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"],
                        help="the SGD/AdamW rows (Muon and MuSGD have their own: --muon-only, --no-muon)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per contender (default 3, or 5 with --full)")
    parser.add_argument("--steps", type=int, default=3, help="calls per timed repeat")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--full", action="store_true", help="the whole size sweep and every model")
    parser.add_argument("--train", action="store_true", help="time whole training iterations (train.py)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd pipeline")
    parser.add_argument("--only", help="run only the workloads whose name contains this")
    parser.add_argument("--out", default="bench-out", help="where the record goes (default: bench-out/, untracked)")
    parser.add_argument("--record", action="store_true", help=f"write to {RECORD_DIR}/, to commit the record")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="leave out the other libraries' optimizers (peers.py)")
    parser.add_argument("--peers-only", action="store_true",
                        help="only the peers, each paired with ours, on BF16 params (every peer; --full: every workload)")
    parser.add_argument("--no-muon", dest="muon", action="store_false",
                        help="leave out the Muon and MuSGD rows (muon.py)")
    parser.add_argument("--muon-only", action="store_true",
                        help="only the Muon and MuSGD rows (with --full: GPT-2 small too)")
    parser.add_argument("--no-fsdp2", dest="fsdp2", action="store_false",
                        help="leave out the FSDP2 rows (fsdp2.py: 2 processes, or one per GPU up to 2)")
    args = parser.parse_args(argv)
    if args.record:
        args.out = RECORD_DIR
    if args.peers_only:
        args.peers, args.fsdp2, args.dtypes = True, False, ["bf16"]
    if args.muon_only:
        args.muon, args.fsdp2, args.optimizers = True, False, []
    if args.repeats is None:  # the default run (SGD and AdamW, FP16/BF16 and FP32): about 3 minutes on 2 cores
        args.repeats = 5 if args.full else 4
    if args.train:
        from .train import main as train_main
        return train_main(args)
    record = run(args, emit=lambda line: print(line, flush=True))
    if args.muon and not args.only and not args.peers_only:
        from .muon import run_muon
        record["muon"] = run_muon(args, emit=lambda line: print(line, flush=True))
    if args.fsdp2 and not args.only:
        record["fsdp2"] = run_fsdp2(args, emit=lambda line: print(line, flush=True))
    # after every row (the Muon rows hold the largest models); the FSDP2 ranks are processes of their
    # own (RUSAGE_CHILDREN gives only the largest child, any child, so it is not reported)
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = table(record)
    print()
    print(text)
    print(f"\npeak memory (RSS) {record['peak_rss_gb']:.1f} GB" + (", FSDP2 ranks apart" if record.get("fsdp2") else ""))
    os.makedirs(args.out, exist_ok=True)
    kind = "peers-" if args.peers_only else "muon-" if args.muon_only else "bench-"
    stem = os.path.join(args.out, kind + record["device_type"] + (f"-{args.only}".replace(" ", "_") if args.only else ""))
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    why_not = plot(record, stem + ".png")
    print(f"wrote {stem}.json, {stem}.md" + (f" and {stem}.png" if why_not is None else f"; no plot: {why_not}"),
          file=sys.stderr)


if __name__ == "__main__":
    main()
