"""python tests/check_install.py: README's install, timed, on a clean copy of this tree in
fresh venvs, CPU-only and (where nvcc is) with the CUDA module for the default
architectures; then the import time over torch. Fails when a build exceeds its budget
(CPU-only 60 s, with nvcc 300 s: README's figures for a 2-core machine) or the import 0.5 s.
Too long for every CI run (the CUDA build alone is minutes); the test suite checks the same
install CPU-only (tests/test_packaging.py) and the import (tests/test_import_time.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_packaging import clean_tree, readme_install_commands  # noqa: E402

BUDGET_S = {"CPU-only": 60, "with nvcc": 300}


def timed_install(label: str, root: str, extra_env: dict) -> float:
    import torch
    tree = clean_tree(os.path.join(root, label.replace(" ", "-"), "clone"))
    venv = os.path.join(root, label.replace(" ", "-"), "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = {**os.environ, **extra_env, "PATH": f"{venv}/bin:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    build_s = None
    for command in readme_install_commands():
        if command.startswith("pip install torch"):  # the local CPU wheel: same version, no download
            command = f"pip install -q torch=={torch.__version__.split('+')[0]}"
        start = time.perf_counter()
        subprocess.run(["bash", "-c", command], cwd=tree, env=env, check=True, capture_output=True)
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
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("FAILED: " + "; ".join(failed) if failed else "all within budget")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
