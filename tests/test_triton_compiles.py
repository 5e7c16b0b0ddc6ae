"""The interpreter runs kernels as Python and forgives what the compiler refuses (a
non-constexpr global, a type mismatch between branches), so every Triton kernel is also
compiled for sm_90, to a cubin, without a GPU. The compile runs in a subprocess because
this test process has the interpreter switched on."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# (master kind, state precision) compiled for every grad dtype and alignment
MODES = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 2)]
COMPILE_ALL = r'''
import json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fused_opt.backends import triton_kernels as k

DT = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
EMA = {False: tl.float32, True: tl.bfloat16}  # both EMA dtypes compiled, alternating with alignment
MODES = %s
def build(fn, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    out = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                         target=GPUTarget("cuda", 90, 32))
    return len(out.asm["cubin"])
sizes = {}
for g in DT:
    for aligned in (False, True):
        for norm_inf in (False, True):
            sizes[f"partials-{g}-{norm_inf}-{aligned}"] = build(k.partials_kernel, {"chunks_ptr": "*i64",
                "table_ptr": "*i64", "scale_ptr": "*fp32", "partials_ptr": "*fp32", "flags_ptr": "*i32"},
                {"GRAD_DTYPE": DT[g], "NORM_INF": norm_inf, "ALIGNED": aligned, "CHUNK": 65536, "BLOCK": 4096})
        # master kind (0 FP32, 1 int16 and 2 int8 remainders: BF16 params only) x state precision
        # (0 FP32, 1 BF16, 2 int8), each with SGD's and AdamW's kernel
        for kind, state in MODES:
            if kind and g == "fp16":
                continue
            constexprs = {"GRAD_DTYPE": DT[g], "PARAM_DTYPE": tl.bfloat16 if kind else DT[g], "MASTER_KIND": kind,
                          "STATE": state, "ALIGNED": aligned, "CHUNK": 65536, "BLOCK": 4096,
                          "EMA_DTYPE": EMA[aligned]}
            sizes[f"update-{g}-{kind}-{state}-{aligned}"] = build(k.update_kernel, {"chunks_ptr": "*i64",
                "table_ptr": "*i64", "groups_ptr": "*fp32", "scalars_ptr": "*fp32", "applied_steps_ptr": "*i32"},
                constexprs)
            sizes[f"adamw-{g}-{kind}-{state}-{aligned}"] = build(k.adamw_kernel, {"chunks_ptr": "*i64",
                "table_ptr": "*i64", "groups_ptr": "*fp32", "scalars_ptr": "*fp32"},
                dict(constexprs, EMA_DTYPE=EMA[not aligned]))
        if aligned:  # the aligned variants must really use 16-byte vector loads
            ptx = triton.compile(triton.compiler.ASTSource(fn=k.update_kernel, signature={"chunks_ptr": "*i64",
                "table_ptr": "*i64", "groups_ptr": "*fp32", "scalars_ptr": "*fp32", "applied_steps_ptr": "*i32",
                "GRAD_DTYPE": "constexpr", "PARAM_DTYPE": "constexpr", "MASTER_KIND": "constexpr", "STATE": "constexpr",
                "ALIGNED": "constexpr", "CHUNK": "constexpr", "BLOCK": "constexpr", "EMA_DTYPE": "constexpr"},
                constexprs={"GRAD_DTYPE": DT[g], "PARAM_DTYPE": DT[g], "MASTER_KIND": 0, "STATE": 0, "ALIGNED": True,
                "CHUNK": 65536, "BLOCK": 4096, "EMA_DTYPE": tl.float32}),
                target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            sizes[f"vector-loads-{g}"] = ptx.count("ld.global.v4")
for dynamic in (False, True):
    for clip, norm_inf in ((False, False), (True, False), (True, True)):
        sizes[f"finalize-{dynamic}-{clip}-{norm_inf}"] = build(k.finalize_kernel, {"partials_ptr": "*fp32",
            "flags_ptr": "*i32", "num_chunks": "i32", "scale_ptr": "*fp32", "tracker_ptr": "*i32",
            "hysteresis_ptr": "*i32", "applied_steps_ptr": "*i32", "skips_ptr": "*i32", "scalars_ptr": "*fp32",
            "grad_norm_ptr": "*fp32", "found_inf_ptr": "*i1", "max_norm": "fp32", "growth_factor": "fp32",
            "backoff_factor": "fp32", "min_scale": "fp32", "max_scale": "fp32", "growth_interval": "i32",
            "hysteresis": "i32"},
            {"HAS_CLIP": clip, "NORM_INF": norm_inf, "DYNAMIC": dynamic, "CONSECUTIVE": dynamic, "BLOCK": 1024})
# Muon's and MuSGD's stage kernels (stack_kernels.py), every flag and master kind
for nesterov in (False, True):
    sizes[f"muon-momentum-{nesterov}"] = build(k.muon_momentum_kernel, {"u_ptr": "*fp32", "buf_ptr": "*fp32",
        "update_ptr": "*bf16", "n": "i64", "found_inf_ptr": "*i1", "one_minus_mu": "fp32", "mu": "fp32"},
        {"NESTEROV": nesterov, "BLOCK": 1024})
    for g, clip in (("bf16", True), ("fp16", False), ("fp32", True)):  # from the raw grads
        sizes[f"muon-momentum-grads-{g}-{nesterov}"] = build(k.muon_momentum_grads_kernel, {"grads_ptr": "*i64",
            "inv_scale_ptr": "*fp32", "clip_ptr": "*fp32", "buf_ptr": "*fp32", "update_ptr": "*bf16", "per": "i64",
            "found_inf_ptr": "*i1", "one_minus_mu": "fp32", "mu": "fp32"},
            {"GRAD_DTYPE": DT[g], "CLIP": clip, "NESTEROV": nesterov, "BLOCK": 1024})
MASTERS = {0: "*fp32", 1: "*i16", 2: "*i8"}
for param, kind in (("fp16", 0), ("bf16", 0), ("bf16", 1), ("bf16", 2)):
    sizes[f"muon-apply-{param}-{kind}"] = build(k.muon_apply_kernel, {"master_ptr": MASTERS[kind],
        "update_ptr": "*bf16", "params_ptr": "*i64", "per": "i64", "found_inf_ptr": "*i1", "decay": "fp32",
        "alpha": "fp32"}, {"PARAM_DTYPE": DT[param], "MASTER_KIND": kind, "BLOCK": 1024})
    for muon, decay, nesterov in ((True, True, True), (False, False, False)):
        sizes[f"musgd-apply-{param}-{kind}-{muon}"] = build(k.musgd_apply_kernel, {"master_ptr": MASTERS[kind],
            "update_ptr": "*bf16", "u_ptr": "*fp32", "buf_ptr": "*fp32", "params_ptr": "*i64", "per": "i64",
            "found_inf_ptr": "*i1", "muon_alpha": "fp32", "scale": "fp32", "weight_decay": "fp32", "mu": "fp32",
            "sgd_alpha": "fp32"}, {"PARAM_DTYPE": DT[param], "MASTER_KIND": kind, "MUON": muon, "DECAY": decay,
            "NESTEROV": nesterov, "BLOCK": 1024})
sizes["advance"] = build(k.advance_kernel, {"chunks_ptr": "*i64", "table_ptr": "*i64", "scalars_ptr": "*fp32",
                                            "num_chunks": "i32"}, {"BLOCK": 1024})
print(json.dumps(sizes))
'''


def test_every_kernel_compiles_for_sm90():  # Muon's stage kernels included
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", COMPILE_ALL % (MODES,)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    bf16_modes = len(MODES)  # BF16 and FP32 grads: every mode; FP16: FP32 masters only
    fp16_modes = sum(1 for kind, _ in MODES if kind == 0)
    updates = 2 * 2 * (2 * bf16_modes + fp16_modes)  # SGD and AdamW, aligned or not
    muon = 2 * (1 + 3) + 4 * 3  # momentum (nesterov or not; from rows or 3 grad dtypes); apply and MuSGD's two
    assert len(sizes) == 3 * 2 * 2 + updates + 3 + 6 + 1 + muon
    assert all(n > 0 for n in sizes.values()), sizes
