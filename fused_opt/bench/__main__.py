"""python -m fused_opt.bench [--device cpu|cuda] [--full] [--train] [--quick] [--out bench/results]

Times one optimizer step of every available fused_opt backend and of the torch.optim
pipelines of SPEC §5 on the same model, side by side in one run, and writes a table, a
JSON record and (with matplotlib) a plot under --out. The default is a representative
subset (a small and a large sweep point, ResNet-50, GPT-2 small, and ResNet-50's and
10,000 tensors of 8 elements, where only host time counts): about 4 minutes on a 2-core CPU; --full runs the whole size sweep. --train times whole training iterations
instead (fused_opt/bench/train.py)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

import fused_opt
from . import workloads
from .contenders import Baseline, Model, build_all
from .plot import plot
from .timing import copy_bandwidth, kernel_launches, paired_ratio, time_interleaved

BYTES_PER_PARAM = 22  # SPEC §5: the lower bound for a step with momentum, FP16 grads, FP32 masters


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def plan(device: torch.device, quick: bool, full: bool = False) -> list[tuple[str, list]]:
    if quick:
        return [("sweep 64K", workloads.sweep(2**16, 8)), ("many small x200", workloads.many_small(200, 64))]
    if not full:  # the representative subset
        large = 2**28 if device.type == "cuda" else 2**24
        small = [] if device.type == "cuda" else [("sweep 1M", workloads.sweep(2**20))]
        return small + [(f"sweep {large / 2**20:.0f}M", workloads.sweep(large)), ("ResNet-50", workloads.resnet50()),
                        ("GPT-2 small", workloads.gpt2()), ("161 x 8", workloads.many_small(161, 8)),
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


def run(args) -> dict:
    device = torch.device(args.device)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    # 256 MB: past every CPU cache too (a 32 MB copy ran partly in L3 and read low against the workloads)
    copy_bps = copy_bandwidth(device, 2**25 if args.quick else 2**28)
    rows = []
    jobs = [(w, s, d) for w, s in plan(device, args.quick, args.full) for d in args.dtypes
            if args.only is None or args.only in w]
    # torch.compile recompiles per shape list (tens of seconds each): it runs on the largest
    # sweep's FP16 row, where the bandwidth claim is made.
    compile_row = max(((workloads.numel(s), w) for w, s, _ in jobs if w.startswith("sweep")), default=(0, None))[1]
    bar = progress(jobs)
    for workload, shapes, dtype_name in bar:
        n = workloads.numel(shapes)
        bar.set_description(f"{workload} {dtype_name} ({n / 1e6:.1f}M params, {len(shapes)} tensors)")
        model = Model(shapes, dtypes[dtype_name], device)
        contenders = build_all(model, device, include_compiled=args.compile and workload == compile_row
                               and dtype_name == "fp16")
        timings = time_interleaved({c.name: c.step for c in contenders}, device, repeats=args.repeats,
                                   steps=args.steps, clocks={c.name: getattr(c, "kernel_clock", None)
                                                             for c in contenders})
        launches = {c.name: kernel_launches(c.step, device) for c in contenders}
        best_torch_timing = min((timings[c.name] for c in contenders if isinstance(c, Baseline)
                                 and " compiled" not in c.name), key=lambda t: t["median_s"])
        best_torch = best_torch_timing["median_s"]
        for c in contenders:
            t = timings[c.name]
            bytes_per_param = getattr(c, "bytes_per_param", BYTES_PER_PARAM)
            bandwidth = bytes_per_param * n / t["median_s"]
            base = timings.get(getattr(c, "baseline_name", None))
            rows.append(dict(workload=workload, dtype=dtype_name, params=n, tensors=len(shapes),
                             contender=c.name, time_ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3,
                             max_ms=t["max_s"] * 1e3, host_ms=None if t["host_s"] is None else t["host_s"] * 1e3,
                             first_ms=t["first_s"] * 1e3,
                             gb_s=bandwidth / 1e9, copy_fraction=bandwidth / copy_bps,
                             speedup_vs_best_torch=best_torch / t["median_s"], launches=launches[c.name],
                             speedup_vs_best_torch_paired=paired_ratio(best_torch_timing, t),
                             samples_ms=[x * 1e3 for x in t["samples"]],
                             bytes_per_param=bytes_per_param,
                             speedup_vs_fused_opt=None if base is None else base["median_s"] / t["median_s"],
                             memory_per_param=c.memory_per_param() if hasattr(c, "memory_per_param") else None))
        del contenders, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": device_name(device), "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _triton_version(),
        "fused_opt": fused_opt.build_info(), "copy_gb_s": copy_bps / 1e9,
        "bytes_per_param": BYTES_PER_PARAM, "repeats": args.repeats, "steps_per_repeat": args.steps,
        "rows": rows,
    }


def progress(jobs):
    """A progress bar on stderr with elapsed and remaining time (tqdm; weighted by nothing
    cleverer than the job count), or plain lines without tqdm."""
    try:
        from tqdm import tqdm
        return tqdm(jobs, file=sys.stderr, unit="workload", dynamic_ncols=True,
                    bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed, ~{remaining} left")
    except ImportError:
        class Lines(list):
            def set_description(self, text):
                print(f"[{self.i}/{len(self)}] {text}", file=sys.stderr, flush=True)

            def __iter__(self):
                for self.i, job in enumerate(list.__iter__(self), 1):
                    yield job
        return Lines(jobs)


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def table(record: dict) -> str:
    lines = [f"Device: {record['device']} | torch {record['torch']} | {record['date']} | "
             f"copy {record['copy_gb_s']:.1f} GB/s (read+write)",
             "",
             "| workload | dtype | params | tensors | contender | ms/step | host ms | first ms | B/param moved | GB/s | % copy | vs best torch | paired | vs fused_opt default | memory B/param | launches |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['contender']} "
                     f"| {r['time_ms']:.3f} | {_ms(r['host_ms'])} | {r['first_ms']:.1f} | {r['bytes_per_param']} "
                     f"| {r['gb_s']:.1f} | {100 * r['copy_fraction']:.0f}% | {r['speedup_vs_best_torch']:.2f}x "
                     f"| {_ratio(r.get('speedup_vs_best_torch_paired'))} "
                     f"| {_ratio(r['speedup_vs_fused_opt'])} | {_ratio(r['memory_per_param'], '')} "
                     f"| {r['launches'] if r['launches'] is not None else '-'} |")
    return "\n".join(lines)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(value, unit="x") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_opt.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per contender (default 3, or 5 with --full)")
    parser.add_argument("--steps", type=int, default=3, help="calls per timed repeat")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--full", action="store_true", help="the whole size sweep and every model")
    parser.add_argument("--train", action="store_true", help="time whole training iterations (train.py)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd pipeline")
    parser.add_argument("--only", help="run only the workloads whose name contains this")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.repeats is None:  # the default run stays near 3 minutes on a 2-core CPU
        args.repeats = 5 if args.full else 3
    if args.train:
        from .train import main as train_main
        return train_main(args)
    record = run(args)
    text = table(record)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench-{record['device_type']}" + (f"-{args.only}".replace(" ", "_") if args.only else ""))
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    drawn = plot(record, stem + ".png")
    print(f"wrote {stem}.json, {stem}.md" + (f" and {stem}.png" if drawn else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
