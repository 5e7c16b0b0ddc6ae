"""Builds fused_opt's native extension: the C++ CPU module always, the CUDA module when nvcc
is found. Neither links against torch: they take raw addresses and the stream from Python,
so one build serves every torch version and builds on a machine without a GPU.

  TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"   GPU architectures (the default), as PyTorch spells them
  FUSED_OPT_NO_CUDA=1                  skip the CUDA module even when nvcc is there
  FUSED_OPT_PORTABLE=1                 build only the portable CPU module (no AVX2/F16C variant)
  CUDA_HOME=/usr/local/cuda            where CUDA is (else /usr/local/cuda, else from nvcc)
  MAX_JOBS=N                           compilers run at once (default: the CPU count)

The modules compile side by side (and nvcc compiles its architectures side by side). Each
build writes fused_opt/_build.json: the modules it built, each with a digest of its sources
and options that is also compiled into the module. The package loads only the modules listed
there whose digest matches, so a module left over from another build (other options, older
sources) is never loaded or reported; a module whose digest changed is rebuilt, not reused.
"""
import glob
import hashlib
import json
import mmap
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
MANIFEST = "_build.json"
SOURCES = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))


def pybind11_include():
    try:
        import pybind11
    except ImportError:
        sys.exit("fused_opt: building needs pybind11 (`pip install pybind11`, or a build with isolation)")
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


def max_jobs():
    return max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))


def cpu_modules():
    """The CPU module twice on x86-64: portable (runs anywhere) and with AVX2/F16C (FP16 then
    converts 8 values per instruction instead of a dozen operations per value), whatever the
    building machine has; the one the running CPU supports is loaded at import
    (native_backend.py), so one wheel runs on every x86-64. -mfma only with -ffp-contract=off:
    contracting a*b+c would change the bits, and both paths must give the same ones; the one
    FMA written by hand (the norm pass) rounds exactly as mul + add there. Elsewhere
    (aarch64, ...) the portable module alone."""
    common = dict(include_dirs=[pybind11_include(), "csrc"], extra_link_args=["-pthread"], language="c++",
                  depends=SOURCES)
    # -fno-math-errno: sqrtf (AdamW) vectorizes; the kernels never read errno. -fno-trapping-math:
    # loops with a select between float expressions (AdamW's lerp, the int8 clamp) vectorize
    # (both arms are computed, then one is kept); it changes no result, only which FP exception
    # flags may be raised, which nothing reads.
    flags = ["-O3", "-std=c++17", "-pthread", "-fno-math-errno", "-fno-trapping-math"]
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


def digest(*parts) -> str:
    """What a module is built from: every csrc file's bytes and the options, hashed."""
    h = hashlib.sha256()
    for path in SOURCES:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()[:16]


def holds(path: str, module_digest: str) -> bool:
    """Whether a built module has this digest compiled in (a string in its binary)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(module_digest.encode()) >= 0


def source_commit():
    """The git commit the sources come from, when they are a clone (None from an sdist)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class BuildNative(build_ext):
    """g++ builds the CPU modules as usual; the CUDA module is compiled and linked by nvcc;
    all of them at once, and the build's manifest is written beside them."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = max_jobs()
        home = cuda_home()
        self.cuda = home if home and os.environ.get("FUSED_OPT_NO_CUDA") != "1" else None
        self.archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        if self.cuda is None:
            print("fused_opt: nvcc not found (or FUSED_OPT_NO_CUDA=1): building without the CUDA module",
                  file=sys.stderr)
            self.extensions = [e for e in self.extensions if not e.name.endswith("_native_cuda")]
        self.built = {}  # module name -> digest

    def module_digest(self, ext) -> str:
        env = {k: os.environ.get(k, "") for k in ("CPPFLAGS", "CFLAGS", "CXXFLAGS", "LDFLAGS")}
        if ext.name.endswith("_native_cuda"):
            return digest(ext.name, self.cuda_command(ext, "<out>", "<digest>"))
        return digest(ext.name, ext.extra_compile_args, ext.extra_link_args, env, sys.version_info[:2])

    def cuda_command(self, ext, out, module_digest):
        return [os.path.join(self.cuda, "bin", "nvcc"), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
                "--cudart", "static", f"--threads={min(max_jobs(), len(gencode_flags(self.archs)))}",
                *gencode_flags(self.archs), f'-DFUSED_OPT_ARCHS="{self.archs}"',
                f'-DFUSED_OPT_BUILD_DIGEST="{module_digest}"',
                "-I", pybind11_include(), "-I", sysconfig.get_paths()["include"], "-I", "csrc",
                *ext.sources, "-o", out]

    def build_extensions(self):
        # The longest compile (CUDA) starts first.
        self.extensions.sort(key=lambda e: not e.name.endswith("_native_cuda"))
        manifest = self.manifest_paths()[0]
        os.makedirs(os.path.dirname(manifest), exist_ok=True)
        for stale in glob.glob(os.path.join(os.path.dirname(manifest), "_native_cuda*")):
            if self.cuda is None:
                os.remove(stale)  # another build's CUDA module: not part of this one
        if os.path.exists(manifest):
            os.remove(manifest)  # a build that stops half way leaves no manifest: nothing loads
        super().build_extensions()
        info = {"modules": self.built, "cuda_archs": self.archs if self.cuda else None,
                "commit": source_commit()}
        with open(manifest, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)

    def build_extension(self, ext):
        module_digest = self.module_digest(ext)
        out = self.get_ext_fullpath(ext.name)
        if os.path.exists(out) and not holds(out, module_digest):
            os.remove(out)  # built from other sources or options: rebuild it, never reuse it
        if ext.name.endswith("_native_cuda"):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if os.path.exists(out) and not self.force:
                self.built["_native_cuda"] = module_digest  # this very build's module is there
                return
            cmd = self.cuda_command(ext, out, module_digest)
            print(" ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
        else:
            ext.define_macros = [("FUSED_OPT_BUILD_DIGEST", f'"{module_digest}"')]
            super().build_extension(ext)
        self.built[ext.name.rpartition(".")[2]] = module_digest

    def manifest_paths(self) -> tuple[str, str]:
        """Where this build writes its manifest, and where an in-place build copies it."""
        built = os.path.join(self.build_lib, "fused_opt", MANIFEST)
        package_dir = self.get_finalized_command("build_py").get_package_dir("fused_opt")
        return built, os.path.join(package_dir, MANIFEST)

    def copy_extensions_to_source(self):
        # In place (pip install -e .): the modules and the manifest go to the source tree
        # together; a CUDA module this build did not make is removed from there too.
        super().copy_extensions_to_source()
        built, inplace = self.manifest_paths()
        self.copy_file(built, inplace, level=self.verbose)
        if self.cuda is None:
            for stale in glob.glob(os.path.join(os.path.dirname(inplace), "_native_cuda*")):
                os.remove(stale)

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping[self.manifest_paths()[0]] = self.manifest_paths()[1]
        return mapping

    def get_outputs(self):
        if self.inplace:
            return list(self.get_output_mapping().keys())
        return [*super().get_outputs(), self.manifest_paths()[0]]

setup(
    ext_modules=[*cpu_modules(), Extension("fused_opt._native_cuda", ["csrc/cuda_step.cu"], depends=SOURCES)],
    cmdclass={"build_ext": BuildNative},
)
