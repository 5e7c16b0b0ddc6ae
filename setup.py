"""Builds fused_opt's native extension: the C++ CPU module always, the CUDA module when nvcc
is found. Neither links against torch: they take raw addresses and the stream from Python,
so one build serves every torch version and builds on a machine without a GPU.

  TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"   GPU architectures (the default), as PyTorch spells them
  FUSED_OPT_NO_CUDA=1                  skip the CUDA module even when nvcc is there
  FUSED_OPT_PORTABLE=1                 build only the portable CPU module (no AVX2/F16C variant)
  CUDA_HOME=/usr/local/cuda            where CUDA is (else /usr/local/cuda, else from nvcc)
"""
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEFAULT_ARCHS = "8.0;9.0+PTX"


def pybind11_include():
    import pybind11
    return pybind11.get_include()


def cuda_home():
    """CUDA's root: $CUDA_HOME, /usr/local/cuda, or what `nvcc --dryrun` says (nvcc on PATH
    may be a wrapper script, so its own location says nothing)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
        match = re.search(r"#\$ TOP=(\S+)", out)
        if match:
            return match.group(1)
    return None


def cpu_modules():
    """The CPU module twice on x86-64: portable (runs anywhere) and with AVX2/F16C (FP16 then
    converts 8 values per instruction instead of a dozen operations per value), whatever the
    building machine has; the one the running CPU supports is loaded at import
    (native_backend.py), so one wheel runs on every x86-64. -mfma only with -ffp-contract=off:
    contracting a*b+c would change the bits, and both paths must give the same ones; the one
    FMA written by hand (the norm pass) rounds exactly as mul + add there. Elsewhere
    (aarch64, ...) the portable module alone."""
    common = dict(include_dirs=[pybind11_include(), "csrc"], extra_link_args=["-pthread"], language="c++")
    # -fno-math-errno: sqrtf (AdamW) vectorizes; the kernels never read errno.
    flags = ["-O3", "-std=c++17", "-pthread", "-fno-math-errno"]
    modules = [Extension("fused_opt._native_cpu", ["csrc/cpu_step.cpp"], extra_compile_args=flags, **common)]
    if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("FUSED_OPT_PORTABLE") != "1":
        modules.append(Extension("fused_opt._native_cpu_avx2", ["csrc/cpu_step.cpp"],
                                 extra_compile_args=[*flags, "-mavx2", "-mf16c", "-mfma", "-ffp-contract=off",
                                                     "-DFUSED_OPT_CPU_MODULE=_native_cpu_avx2"], **common))
    return modules


def gencode_flags(arch_list: str):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", spaces or semicolons) -> nvcc -gencode flags."""
    flags = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        number = entry.replace("+PTX", "").replace(".", "")
        codes = [f"sm_{number}"] + ([f"compute_{number}"] if ptx else [])
        flags.append(f"-gencode=arch=compute_{number},code=[{','.join(codes)}]")
    return flags


class BuildNative(build_ext):
    """g++ builds the CPU module as usual; the CUDA module is compiled and linked by nvcc."""

    def build_extension(self, ext):
        if ext.name.endswith("_native_cuda"):
            self.build_cuda(ext)
        else:
            super().build_extension(ext)

    def build_cuda(self, ext):
        home = cuda_home()
        if home is None or os.environ.get("FUSED_OPT_NO_CUDA") == "1":
            print("fused_opt: nvcc not found (or FUSED_OPT_NO_CUDA=1): building without the CUDA module",
                  file=sys.stderr)
            return
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd = [os.path.join(home, "bin", "nvcc"), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
               "--cudart", "static", *gencode_flags(archs), f'-DFUSED_OPT_ARCHS="{archs}"',
               "-I", pybind11_include(), "-I", sysconfig.get_paths()["include"], "-I", "csrc",
               *ext.sources, "-o", out]
        print(" ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)


setup(
    ext_modules=[*cpu_modules(), Extension("fused_opt._native_cuda", ["csrc/cuda_step.cu"])],
    cmdclass={"build_ext": BuildNative},
)
