"""The native extension as built: what it reports, which GPU architectures its binary
holds, and how availability follows CUDA's compatibility rules (checked without a GPU)."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

import fused_opt
from fused_opt.backends import native_backend


def test_build_info_reports_the_native_parts():
    info = fused_opt.build_info()
    assert info["native_cpu"] is True  # always built by `pip install .`
    if info["native_cuda"]:
        assert info["cuda_version"].count(".") == 1
        assert info["cuda_archs"] and all(a.count(".") == 1 for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == [] and "not loaded" in fused_opt.backend_availability("cuda")["native"]


def cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(not native_backend.build_info()["native_cuda"], reason="built without nvcc")
def test_cuda_binary_holds_the_compiled_architectures():
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (it ships with CUDA and with the triton wheel)")
    library = glob.glob(os.path.join(os.path.dirname(fused_opt.__file__), "_native_cuda*.so"))[0]
    elf = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    for arch in native_backend.compiled_archs():
        assert f"sm_{arch.replace('.', '')}" in elf, (arch, elf)
    for arch in native_backend.build_info()["cuda_ptx_archs"]:
        assert f"sm_{arch.replace('.', '')}" in ptx, (arch, ptx)


@pytest.mark.skipif(not native_backend.build_info()["native_cuda"], reason="built without nvcc")
def test_arch_compatibility_rules(monkeypatch):
    class Fake:
        ARCH_LIST = "8.0;9.0+PTX"
        CUDA_VERSION = 13000
    monkeypatch.setattr(native_backend, "_native_cuda", Fake)
    assert native_backend.runs_on_capability(8, 0)
    assert native_backend.runs_on_capability(8, 6)       # sm_80 code runs on sm_86 / sm_89
    assert native_backend.runs_on_capability(9, 0)
    assert native_backend.runs_on_capability(12, 0)      # compute_90 PTX is JIT-compiled there
    assert not native_backend.runs_on_capability(7, 5)
    Fake.ARCH_LIST = "8.0"
    assert not native_backend.runs_on_capability(9, 0)   # no PTX: sm_80 code never runs on 9.x
    Fake.ARCH_LIST = "9.0a"
    assert native_backend.runs_on_capability(9, 0) and not native_backend.runs_on_capability(10, 0)


def test_unavailable_cuda_is_explained_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    reason = fused_opt.backend_availability("cuda")["native"]
    assert reason and ("no CUDA GPU" in reason or "not loaded" in reason)
    from fused_opt import backends
    with pytest.raises(RuntimeError, match="backend 'native' is not available on cuda"):
        backends.resolve("native", torch.device("cuda"))
