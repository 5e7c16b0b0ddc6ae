"""python tests/check_first_hour.py: a newcomer's first commands, timed, on a fresh clone of
this repository's HEAD in fresh venvs: README's install CPU-only and (where nvcc is) with the
CUDA module for the default architectures, the import over torch, and the main benchmark
(`python -m fused_opt.bench`, what `make bench` runs). Fails past a budget: builds 60 s
CPU-only and 300 s with nvcc, the import 0.5 s, the benchmark 4 minutes and 8 GB (README's
figures for a 2-core machine), or a benchmark record without its commit. Too long for every
CI run; the test suite checks the same install CPU-only (tests/test_packaging.py), the
import (tests/test_import_time.py) and the benchmark's plan and report (tests/test_bench.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_packaging import ROOT, readme_install_commands  # noqa: E402

BUDGET_S = {"CPU-only": 60, "with nvcc": 300}
BENCH_BUDGET_S, BENCH_BUDGET_GB = 240, 8.0


def timed_install(label: str, root: str, extra_env: dict) -> float:
    import torch
    tree = os.path.join(root, label.replace(" ", "-"), "clone")
    subprocess.run(["git", "clone", "-q", ROOT, tree], check=True)
    venv = os.path.join(root, label.replace(" ", "-"), "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = {**os.environ, **extra_env, "PATH": f"{venv}/bin:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    build_s = None
    for command in readme_install_commands():
        if command.startswith("pip install torch"):  # the local CPU wheel: same version, no download
            command = f"pip install -q torch=={torch.__version__.split('+')[0]}"
        start = time.perf_counter()
        out = subprocess.run(["bash", "-c", command], cwd=tree, env=env, check=True, capture_output=True,
                             text=True).stdout
        if "build_info()" in command and "'native_cpu': True" not in out:
            raise SystemExit(f"README's check printed no native CPU module: {out}")
        if command == "pip install --no-build-isolation .":
            build_s = time.perf_counter() - start
    info = subprocess.run([f"{venv}/bin/python", "-c", "import fused_opt; print(fused_opt.build_info())"],
                          cwd=root, env=env, check=True, capture_output=True, text=True).stdout.strip()
    print(f"{label}: pip install --no-build-isolation . took {build_s:.0f} s (budget {BUDGET_S[label]} s): {info}")
    return build_s


def import_time(python: str) -> float:
    probe = ("import time; t = time.perf_counter(); import torch; t1 = time.perf_counter(); import fused_opt; "
             "print(time.perf_counter() - t1)")
    return min(float(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout)
               for _ in range(5))


def main_job(root: str) -> list[str]:
    """`python -m fused_opt.bench` in the CPU-only venv, from its clone: wall time, peak memory
    (the record's own peak RSS), and the commit it records."""
    import json
    python = os.path.join(root, "CPU-only", "venv", "bin", "python")
    out = os.path.join(root, "bench-out")
    start = time.perf_counter()
    subprocess.run([python, "-m", "fused_opt.bench", "--out", out], cwd=root, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "bench-cpu.json")) as f:
        record = json.load(f)
    print(f"python -m fused_opt.bench: {seconds:.0f} s, peak RSS {record['peak_rss_gb']:.1f} GB, "
          f"commit {record['commit']} (budget {BENCH_BUDGET_S} s, {BENCH_BUDGET_GB} GB)")
    failed = []
    if seconds > BENCH_BUDGET_S or record["peak_rss_gb"] > BENCH_BUDGET_GB:
        failed.append(f"bench {seconds:.0f} s / {record['peak_rss_gb']:.1f} GB")
    if not record["fused_opt"]["native_cpu"]:
        failed.append("the benchmark ran without the native CPU module")
    if not record["commit"] or record["commit"].startswith("unknown"):
        failed.append(f"bench commit {record['commit']!r}")
    return failed


def main() -> int:
    root = tempfile.mkdtemp(prefix="fused_opt-install-")
    failed = []
    try:
        runs = {"CPU-only": {"FUSED_OPT_NO_CUDA": "1"}}
        if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
            runs["with nvcc"] = {}
        for label, env in runs.items():
            seconds = timed_install(label, root, env)
            if seconds > BUDGET_S[label]:
                failed.append(f"{label} build {seconds:.0f} s > {BUDGET_S[label]} s")
        seconds = import_time(os.path.join(root, "CPU-only", "venv", "bin", "python"))
        print(f"import fused_opt after torch: {seconds:.3f} s (budget 0.5 s)")
        if seconds > 0.5:
            failed.append(f"import {seconds:.2f} s > 0.5 s")
        failed += main_job(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("FAILED: " + "; ".join(failed) if failed else "all within budget")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
