"""backend="native": the compiled extension (csrc/). `_native_cpu` runs CPU tensors with C++
kernels; `_native_cuda` runs CUDA tensors. Both take addresses from the same host tables as
the Triton backend (multi_tensor.py) and do the same three launches."""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import mmap
import os
import re
import time
from functools import partial

import torch

from ..transaction import _interrupts_held
from . import StepBatch
from .multi_tensor import CHUNK_SIZE, REMAINDER8, REMAINDER16, plan_for

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/dispatch.h
# BF16 param codes whose master column holds remainders (kBFloat16Remainder, kBFloat16Remainder8)
BF16_REMAINDER, BF16_REMAINDER8 = 3, 4
# Module-level names of the launches, so tests can count them.
LAUNCH_ENTRY_POINTS = ["launch_partials", "launch_finalize", "launch_update", "launch_step"]
# A step with nothing to do between its passes goes to the module's one-call `step`; tests
# turn this off to run the three launches that a step over DTensor shards takes.
ONE_CALL = True

def _read_manifest() -> dict | None:
    """What the last build of this install made (setup.py writes it beside the modules)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


MANIFEST = _read_manifest()


def _import_built(name: str):
    """fused_opt.<name> if this install's build made it, else ImportError saying why. A module
    file from another build (other options or sources) is not even loaded: its digest is
    checked in the file first, then in the loaded module."""
    if MANIFEST is None:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.exists(os.path.join(os.path.dirname(package), "setup.py")):
            raise ImportError(f"fused_opt was imported from its unbuilt source tree ({package}), which shadows "
                              "any installed copy from inside the clone: run from another directory, or build "
                              "in place with `pip install --no-build-isolation -e .`")
        raise ImportError("the native extension was not built (no fused_opt/_build.json; "
                          "`pip install --no-build-isolation .` builds it)")
    expected = MANIFEST.get("modules", {}).get(name)
    if expected is None:
        raise ImportError(f"{name} was not part of this build")
    spec = importlib.util.find_spec(f"fused_opt.{name}")
    if spec is None or spec.origin is None:
        raise ImportError(f"{name} was built but its file is missing")
    with open(spec.origin, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(expected.encode()) < 0:
            raise ImportError(f"{spec.origin} comes from another build than fused_opt/_build.json records "
                              "(other options or sources): reinstall")
    module = importlib.import_module(f"fused_opt.{name}")
    if getattr(module, "BUILD_DIGEST", None) != expected:
        raise ImportError(f"{spec.origin} comes from another build: reinstall")
    return module


def _load_cpu_modules() -> dict:
    """The CPU modules that were built: "portable" and, on x86-64, "avx2" (setup.py)."""
    modules = {}
    for path, name in (("portable", "_native_cpu"), ("avx2", "_native_cpu_avx2")):
        try:
            modules[path] = _import_built(name)
        except ImportError as exc:
            modules.setdefault("_errors", []).append(f"{name}: {exc}")
    return modules


def _cpu_supports(path: str) -> bool:
    """Whether the running CPU has the instructions of a CPU path; torch's own dispatch asks
    the CPU when it loads, and we take its answer ("DEFAULT", "AVX2", "AVX512", ...)."""
    if path == "portable":
        return True
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return capability in ("AVX2", "AVX512", "AVX512_BF16", "AMX") and _has_flags("f16c", "fma")


def _has_flags(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            present = next(line for line in f if line.startswith("flags")).split()
        return all(flag in present for flag in flags)
    except (OSError, StopIteration):
        return True  # every AVX2 CPU has F16C and FMA; /proc/cpuinfo is only a second opinion


def _choose_cpu_module(modules: dict, forced: str | None):
    """The fastest CPU path both built and supported here; FUSED_OPT_CPU_PATH=portable|avx2
    forces one (an unsupported or unbuilt choice raises at import)."""
    if forced:
        if forced not in modules or not _cpu_supports(forced):
            raise ImportError(f"FUSED_OPT_CPU_PATH={forced!r}: not built or not supported by this CPU")
        return modules[forced]
    for path in ("avx2", "portable"):
        if path in modules and _cpu_supports(path):
            return modules[path]
    return None


CPU_MODULES = _load_cpu_modules()
_native_cpu = _choose_cpu_module(CPU_MODULES, os.environ.get("FUSED_OPT_CPU_PATH"))
_cpu_error = "; ".join(CPU_MODULES.get("_errors", [])) or "no CPU module loads on this CPU"


def use_cpu_path(path: str):
    """Switches the CPU kernels to another built path (tests run every path this CPU can);
    returns the previous module."""
    global _native_cpu
    previous = _native_cpu
    _native_cpu = _choose_cpu_module(CPU_MODULES, path)
    return previous
try:
    _native_cuda, _cuda_error = _import_built("_native_cuda"), None
except ImportError as exc:  # built without nvcc
    _native_cuda, _cuda_error = None, str(exc)


def _arch_entries() -> list[tuple[str, bool]]:
    """(arch, has_ptx) for each TORCH_CUDA_ARCH_LIST entry the CUDA module was built with."""
    if _native_cuda is None:
        return []
    return [(entry.replace("+PTX", ""), entry.endswith("+PTX"))
            for entry in re.split(r"[;\s]+", _native_cuda.ARCH_LIST) if entry]


def compiled_archs() -> list[str]:
    """["8.0", "9.0"]: the architectures the CUDA module holds machine code for."""
    return [arch for arch, _ in _arch_entries()]


def _ptx_archs() -> list[str]:
    return [arch for arch, ptx in _arch_entries() if ptx]


def _parse(arch: str) -> tuple[int, int, str]:
    """"9.0a" -> (9, 0, "a"): an "a" (arch-specific) build runs on that exact GPU only."""
    major, minor, suffix = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)", arch).groups()
    return int(major), int(minor), suffix


def runs_on_capability(major: int, minor: int) -> bool:
    """CUDA's rules: sm_XY code runs on X.Y' for Y' >= Y (same X), sm_XYa on X.Y only; PTX
    for compute_XY is compiled by the driver for any newer GPU."""
    for arch, ptx in _arch_entries():
        a_major, a_minor, suffix = _parse(arch)
        if a_major == major and (a_minor == minor if suffix else a_minor <= minor):
            return True
        if ptx and not suffix and (a_major, a_minor) <= (major, minor):
            return True
    return False


def build_info() -> dict:
    version = None
    if _native_cuda is not None:
        version = f"{_native_cuda.CUDA_VERSION // 1000}.{_native_cuda.CUDA_VERSION % 1000 // 10}"
    return {"native_cpu": _native_cpu is not None, "cpu_path": getattr(_native_cpu, "CPU_PATH", None),
            "cpu_paths_built": sorted(k for k in CPU_MODULES if not k.startswith("_")),
            "native_cuda": _native_cuda is not None,
            "cuda_version": version, "cuda_archs": compiled_archs(), "cuda_ptx_archs": _ptx_archs(),
            "not_loaded": [*CPU_MODULES.get("_errors", []), *([f"_native_cuda: {_cuda_error}"] if _cuda_error else [])],
            "commit": (MANIFEST or {}).get("commit")}


def availability(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None if _native_cpu is not None else f"the native CPU module was not built ({_cpu_error})"
    if device.type == "cuda":
        if _native_cuda is None:
            return (f"the native CUDA module was not loaded ({_cuda_error}; it is built when nvcc is found "
                    "at install time: install CUDA and reinstall with `pip install --no-build-isolation .`)")
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        major, minor = torch.cuda.get_device_capability(device)
        if not runs_on_capability(major, minor):
            return (f"the GPU's architecture {major}.{minor} was not compiled (built for "
                    f"{_native_cuda.ARCH_LIST}); reinstall with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\"")
        return None
    return f"no native kernels for {device.type} tensors"


def _module_and_stream(device: torch.device):
    if device.type == "cuda":
        return _native_cuda, torch.cuda.current_stream(device).cuda_stream
    global _cpu_threads
    threads = torch.get_num_threads()  # the CPU kernels use as many threads as torch's ops would
    if threads != _cpu_threads:
        _native_cpu.set_num_threads(threads)
        _cpu_threads = threads
    return _native_cpu, 0


_cpu_threads = None  # what the CPU module's pool was last limited to


# The benchmark sets a [seconds] list here: the time spent inside the kernels, which on the CPU
# run on the calling thread, so that the rest of a step can be reported as host time.
kernel_clock = None


def _call(kernel, args) -> None:
    if kernel_clock is None:
        kernel(*args)
        return
    start = time.perf_counter()
    kernel(*args)
    kernel_clock[0] += time.perf_counter() - start


def launch_partials(module, *args):
    _call(module.partials, args)


def launch_finalize(module, *args):
    _call(module.finalize, args)


def launch_update(module, *args):
    _call(module.update, args)


def launch_step(module, *args):
    _call(module.step, args)


def one_call(batch: StepBatch) -> bool:
    """Whether this step's launches are one call (Transaction then has nothing to roll back:
    the module checks every record before its first write, and a reduction across ranks
    inside it writes only scratch)."""
    return ONE_CALL


def _static_args(plan) -> dict:
    """The addresses a plan keeps for its lifetime (its chunk tables, partial slots, scalars),
    read once: tensor slicing and data_ptr calls were most of a small step's host time."""
    args = plan.cache.get("native")
    if args is None:
        norm = [(run, run.chunks.data_ptr(), plan.partials[run.chunk_base:].data_ptr(),
                 plan.flags[run.chunk_base:].data_ptr(), DTYPE_CODES[run.grad_dtype]) for run in plan.norm_passes()]
        param_code = {REMAINDER16: BF16_REMAINDER, REMAINDER8: BF16_REMAINDER8}
        update = [(pair, pair.chunks.data_ptr(), DTYPE_CODES[pair.grad_dtype],
                   param_code.get(pair.master_kind, DTYPE_CODES[pair.param_dtype])) for pair in plan.pairs]
        args = plan.cache["native"] = dict(norm=norm, update=update, partials=plan.partials.data_ptr(),
                                           flags=plan.flags.data_ptr(), scalars=plan.scalars.data_ptr(),
                                           ema_dtype=DTYPE_CODES[plan.ema_dtype or torch.float32],
                                           fold_row=0 if plan.fold_row is None else plan.fold_row.data_ptr())
    return args


def _records(plan, static) -> tuple:
    """The one-call step's norm and update records (csrc/bindings.h: NormRecord,
    UpdateRecord), host memory packed once per set of chunk tables."""
    cached = plan.cache.get("records")
    if cached is None or cached[0] != plan.tables_version:
        norms = torch.tensor([[chunks, run.num_chunks, run.table.data_ptr(), partials, flags, dtype]
                              for run, chunks, partials, flags, dtype in static["norm"]] or [[0] * 6],
                             dtype=torch.int64)
        updates = torch.tensor([[chunks, pair.num_chunks, pair.table.data_ptr(), grad_dtype, param_dtype, plan.rule,
                                 static["ema_dtype"], plan.state_code]
                                for pair, chunks, grad_dtype, param_dtype in static["update"]] or [[0] * 8],
                               dtype=torch.int64)
        cached = plan.cache["records"] = (plan.tables_version, norms, len(static["norm"]), updates,
                                          len(static["update"]))
    return cached[1:]


def step(batch: StepBatch) -> None:
    plan = plan_for(batch, CHUNK_SIZE)
    module, stream = _module_and_stream(plan.device)
    norm_inf = batch.norm_type == math.inf
    scaler = batch.scaler
    scale, applied, static = scaler.scale.data_ptr(), batch.applied_steps.data_ptr(), _static_args(plan)
    finalize_args = (scale, scaler.growth_tracker.data_ptr(), scaler.hysteresis_tracker.data_ptr(), applied,
                     batch.consecutive_skips.data_ptr(), batch.grad_norm.data_ptr(), batch.found_inf.data_ptr(),
                     batch.max_grad_norm or 0.0, scaler.growth_factor, scaler.backoff_factor, scaler.min_scale,
                     scaler.max_scale, scaler.growth_interval, scaler.hysteresis, batch.max_grad_norm is not None,
                     norm_inf, scaler.dynamic, scaler.consecutive)
    groups = plan.group_table.data_ptr()
    if one_call(batch):
        norms, num_norms, updates, num_updates = _records(plan, static)
        across, fold_row = None, 0
        if plan.fold_row is not None:  # DTensor params on one mesh: the module folds the partials
            across, fold_row = partial(batch.reduce_stats, plan.fold_row, norm_inf), static["fold_row"]
        elif batch.reduce_stats is not None:
            across = partial(plan.reduce_across_shards, batch, norm_inf)
        args = (norms.data_ptr(), num_norms, updates.data_ptr(), num_updates, groups, static["scalars"],
                static["partials"], static["flags"], plan.norm_chunks, *finalize_args, plan.chunk_size, stream,
                across, fold_row)
        if batch.flat_grads is not None:  # nothing after the call: flat steps stage nothing, bump no versions
            launch_step(module, *args)
            return
        with _interrupts_held():  # an interrupt must not fall between the call and the write-back
            launch_step(module, *args)
            plan.write_back(batch)
        return
    for run, chunks, partials, flags, grad_dtype in static["norm"]:
        launch_partials(module, chunks, run.num_chunks, run.table.data_ptr(), scale, partials, flags, grad_dtype,
                        norm_inf, plan.chunk_size, stream)
    num_partials = plan.reduce_across_shards(batch, norm_inf)
    launch_finalize(module, static["partials"], static["flags"], num_partials, *finalize_args[:5],
                    static["scalars"], *finalize_args[5:], stream)
    launch_updates(plan, batch.rule.code, applied)
    plan.write_back(batch)


def launch_updates(plan, rule_code: int, applied: int) -> None:
    """The update launches of a plan whose scalars (1/S, clip, found_inf, EMA weight) are
    written; `applied`: the address of the applied-step count (int32)."""
    module, stream = _module_and_stream(plan.device)
    static = _static_args(plan)
    for pair, chunks, grad_dtype, param_dtype in static["update"]:
        launch_update(module, chunks, pair.num_chunks, pair.table.data_ptr(), plan.group_table.data_ptr(),
                      static["scalars"], applied, grad_dtype, param_dtype, rule_code, static["ema_dtype"],
                      plan.state_code, plan.chunk_size, stream)
