"""Ship it: `python -m build` gives an sdist and a wheel (built from the sdist), and each
installs into a fresh venv that has torch (--no-build-isolation), builds or carries the CPU
and CUDA modules, and steps with backend="native". The CUDA part is built for one arch
(9.0) to bound the time; nothing of it runs here."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = (
    "import torch, fused_opt\n"
    "info = fused_opt.build_info()\n"
    "p = torch.nn.Parameter(torch.ones(1000, dtype=torch.float16))\n"
    "opt = fused_opt.FusedMixedPrecisionSGD([p], lr=0.5, loss_scale=None, backend='native')\n"
    "opt.scale_loss(p.float().sum()).backward()\n"
    "opt.step()\n"
    "assert float(p[0]) == 0.5, float(p[0])\n"
    "print('stepped', fused_opt.__file__, info)\n"
)


def run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
    return out.stdout


@pytest.mark.timeout(1500)
def test_sdist_and_wheel_install_into_a_fresh_venv(tmp_path):
    pytest.importorskip("build")
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0"}
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), ROOT], env=env)
    sdist, = glob.glob(str(dist / "*.tar.gz"))
    wheel, = glob.glob(str(dist / "*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    import torch
    run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", "pybind11",
         "setuptools", "wheel"], env=env)
    for artifact in (sdist, wheel):
        run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--force-reinstall", "--no-deps", artifact],
            env=env)
        out = run([python, "-c", STEP], cwd=str(tmp_path))  # not the repository's fused_opt
        assert "stepped" in out and str(venv) in out
        assert "'native_cpu': True" in out and "'native_cuda': True" in out and "'cuda_archs': ['9.0']" in out
