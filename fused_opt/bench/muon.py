"""Muon and MuSGD beside the torch pipelines that do the same job, in one run.

The job: BF16 params with scaled grads; unscale, inf check, clip by the global norm, Muon (or
MuSGD) on the matrices and AdamW (or SGD) on the rest, on FP32 masters, write-back.

- torch: torch.optim.Muon on FP32 masters kept by hand (a conv weight's master is its 2-D
  view, which torch.optim.Muon takes) and torch.optim.AdamW(foreach) on the rest, grads
  unscaled and checked by torch's AMP kernel, clip_grad_norm_(foreach), the step skipped on
  an overflow as GradScaler skips it, masters copied back.
- MuSGD: the same pipeline around a transcription of Ultralytics' MuSGD step (their
  per-param loop; SGD with momentum on the params that are not matrices).
- ours: FusedMixedPrecisionMuon / FusedMixedPrecisionMuSGD on the BF16 params, default
  (FP32 masters and momentum) and remainder8 + int8 momentum.

Workloads: a YOLO-style detector at nano width (303 tensors: 103 conv weights, BatchNorm
vectors; 2.8M params) and at 1/20 of YOLOv8x's width (the same 303 tensors, 0.2M params: host
work), and with --full GPT-2 small (48 Muon matrices; embeddings, norms and biases on AdamW).
"""
from __future__ import annotations

import torch

import fused_opt
from fused_opt import newton_schulz
from . import workloads
from .contenders import MAX_NORM, Model, storage_bytes_per_param
from .timing import kernel_launches, paired_ratio, spread, time_interleaved

MUON = dict(lr=0.02, momentum=0.95, weight_decay=0.01)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
MUSGD = dict(lr=0.01, momentum=0.937, weight_decay=5e-4, nesterov=True)


def workload_plan(full: bool, quick: bool = False) -> list[tuple[str, list, tuple, int | None]]:
    """(name, shapes, optimizers, most repeats); GPT-2 small's Newton-Schulz is ~1.5 TFLOP a
    step (seconds on a CPU), so it is timed over 4 repeats of one step."""
    if quick:
        return [("detector x0.05", workloads.detector(0.05), ("muon", "musgd"), None)]
    plan = [("YOLO-style detector-n", workloads.detector(0.2), ("muon", "musgd"), None),
            ("YOLO-style detector at 1/20 width", workloads.detector(0.05), ("muon", "musgd"), None)]
    if full:
        plan.append(("GPT-2 small", workloads.gpt2(), ("muon",), 4))
    return plan


def is_matrix(shape, embeddings: set) -> bool:
    """What Muon orthogonalizes: matrices and conv weights, not embeddings (the GPT-2 rows'
    vocabulary and position tables, as the Muon reference keeps them on AdamW)."""
    return len(shape) >= 2 and tuple(shape) not in embeddings


def _embeddings(shapes) -> set:
    return {s for s in shapes if len(s) == 2 and s[0] in (50257, 1024) and s[1] == 768}


class TorchMuonPipeline:
    """torch.optim.Muon (+ AdamW) or a MuSGD transcription on FP32 masters kept by hand."""

    def __init__(self, model: Model, optimizer: str):
        self.model = model
        self.params = model.fresh_params()
        embeddings = _embeddings([tuple(p.shape) for p in self.params])
        self.matrix = [is_matrix(p.shape, embeddings) for p in self.params]
        # masters: a matrix's as its 2-D view (what torch.optim.Muon accepts)
        self.masters = [p.detach().float().reshape(newton_schulz.matrix_shape(p.shape)) if m else p.detach().float()
                        for p, m in zip(self.params, self.matrix)]
        for w in self.masters:
            w.grad = torch.zeros_like(w)
        matrices = [w for w, m in zip(self.masters, self.matrix) if m]
        others = [w for w, m in zip(self.masters, self.matrix) if not m]
        if optimizer == "muon":
            self.name = "torch.optim.Muon + AdamW(foreach)"
            self.opts = [torch.optim.Muon(matrices, **MUON), torch.optim.AdamW(others, foreach=True, **ADAMW)]
        else:
            self.name = "MuSGD (Ultralytics' step, transcribed)"
            self.opts = [TranscribedMuSGD([dict(params=matrices, use_muon=True), dict(params=others, use_muon=False)],
                                          **MUSGD)]
        self.scale = torch.full((), model.scale)
        self.found_inf = torch.zeros(())
        self.growth_tracker = torch.zeros((), dtype=torch.int32)

    def step(self):
        grads = [w.grad for w in self.masters]
        torch._foreach_copy_(grads, [p.grad.view(w.shape) for p, w in zip(self.params, self.masters)])
        self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self.scale.reciprocal())
        torch.nn.utils.clip_grad_norm_(self.masters, MAX_NORM, foreach=True)
        if not self.found_inf.item():
            for opt in self.opts:
                opt.step()
        torch._foreach_copy_([p.data.view(w.shape) for p, w in zip(self.params, self.masters)], self.masters)
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)

    def held(self) -> list:
        state = [t for opt in self.opts for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return self.masters + [w.grad for w in self.masters] + state


class TranscribedMuSGD(torch.optim.Optimizer):
    """Ultralytics' MuSGD.step, transcribed: per param, in use_muon groups, the Muon step
    (lerp momentum, their Newton-Schulz on the 2-D view, scaled) at lr * muon, then SGD with
    momentum at lr * sgd; SGD alone in the other groups."""

    def __init__(self, params, lr, momentum, weight_decay, nesterov, muon=0.5, sgd=0.5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      use_muon=False))
        self.muon, self.sgd = muon, sgd

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu, lr, wd, nesterov = group["momentum"], group["lr"], group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    if group["use_muon"]:
                        state["momentum_buffer_SGD"] = torch.zeros_like(p)
                if group["use_muon"]:
                    buf = state["momentum_buffer"].lerp_(g, 1 - mu)
                    update = g.lerp(buf, mu) if nesterov else buf
                    update = newton_schulz.orthogonalize([update], "ultralytics")[0]
                    update = update * max(1, g.size(-2) / g.size(-1)) ** 0.5
                    p.add_(update, alpha=-(lr * self.muon))
                    sgd_buf, sgd_lr = state["momentum_buffer_SGD"], lr * self.sgd
                else:
                    sgd_buf, sgd_lr = state["momentum_buffer"], lr
                if wd != 0:
                    g = g.add(p, alpha=wd)
                sgd_buf.mul_(mu).add_(g)
                p.add_(g.add(sgd_buf, alpha=mu) if nesterov else sgd_buf, alpha=-sgd_lr)


class OursMuon:
    def __init__(self, model: Model, optimizer: str, master_weights="fp32", state_precision="fp32"):
        self.model = model
        self.params = model.fresh_params()
        embeddings = _embeddings([tuple(p.shape) for p in self.params])
        matrices = [p for p in self.params if is_matrix(p.shape, embeddings)]
        others = [p for p in self.params if not is_matrix(p.shape, embeddings)]
        mode = "" if master_weights == "fp32" else f" [{master_weights} + {state_precision} momentum]"
        common = dict(max_grad_norm=MAX_NORM, loss_scale="dynamic", init_scale=model.scale,
                      master_weights=master_weights, state_precision=state_precision)
        if optimizer == "muon":
            self.name = "FusedMixedPrecisionMuon" + mode
            self.opt = fused_opt.FusedMixedPrecisionMuon(
                [dict(params=matrices), dict(params=others, algorithm="adamw", **ADAMW)], **MUON, **common)
        else:
            self.name = "FusedMixedPrecisionMuSGD" + mode
            self.opt = fused_opt.FusedMixedPrecisionMuSGD(
                [dict(params=matrices, use_muon=True), dict(params=others)], **MUSGD, **common)

    def step(self):
        self.opt.scale_loss(self.model.loss)
        self.opt.step()

    def held(self) -> list:
        return [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def host_ops(fn) -> int:
    """torch ops one call dispatches from Python: aten ops not called by another op (inside a
    step's record_function too), the host work that bounds a step of many small tensors."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    def from_python(e):
        parent = e.cpu_parent
        return e.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))
    return sum(1 for e in events if from_python(e))


def run_muon(args, emit=print) -> list:
    """Rows: each workload and optimizer, the torch pipeline and ours timed round by round."""
    device = torch.device(args.device)
    rows = []
    for workload, shapes, optimizers, most in workload_plan(args.full, args.quick):
        model = Model(shapes, torch.bfloat16, device)
        n = workloads.numel(shapes)
        for optimizer in optimizers:
            emit(f"{optimizer} {workload}: {n / 1e6:.1f}M params, {len(shapes)} tensors")
            contenders = [TorchMuonPipeline(model, optimizer), OursMuon(model, optimizer),
                          OursMuon(model, optimizer, "remainder8", "int8")]
            repeats, steps = (args.repeats, args.steps) if most is None else (min(args.repeats, most), 1)
            times = time_interleaved({c.name: c.step for c in contenders}, device, repeats=repeats, steps=steps,
                                     warmup=1 if most else 2)
            base = times[contenders[0].name]
            for c in contenders:
                t = times[c.name]
                params = c.params
                row = dict(workload=workload, optimizer=optimizer, dtype="bf16", params=n, tensors=len(shapes),
                           contender=c.name, time_ms=t["median_s"] * 1e3, first_ms=t["first_s"] * 1e3,
                           samples_ms=[x * 1e3 for x in t["samples"]], spread=spread(t["samples"]),
                           speedup_vs_torch_paired=None if c is contenders[0] else paired_ratio(base, t),
                           bytes_per_param_held=storage_bytes_per_param(params, c.held()),
                           host_ops=host_ops(c.step), launches=kernel_launches(c.step, device))
                rows.append(row)
                ratio = "" if row["speedup_vs_torch_paired"] is None else f"  {row['speedup_vs_torch_paired']:.2f}x paired"
                emit(f"    {c.name:<58} {row['time_ms']:9.2f} ms  {row['bytes_per_param_held']:.2f} B/param  "
                     f"{row['host_ops']} host ops{ratio}")
            del contenders
    return rows


def muon_table(rows: list) -> str:
    lines = ["| workload | optimizer | contender | ms/step | vs torch (paired) | B/param held | host ops / step |"
             + (" GPU launches |" if any(r["launches"] is not None for r in rows) else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if any(r["launches"] is not None for r in rows) else "")]
    for r in rows:
        ratio = "–" if r["speedup_vs_torch_paired"] is None else f"{r['speedup_vs_torch_paired']:.2f}x"
        launches = "" if r["launches"] is None else f" {r['launches']} |"
        lines.append(f"| {r['workload']} ({r['params'] / 1e6:.1f}M, {r['tensors']} tensors) | {r['optimizer']} | "
                     f"{r['contender']} | {r['time_ms']:.2f} | {ratio} | {r['bytes_per_param_held']:.2f} | "
                     f"{r['host_ops']} |{launches}")
    return "\n".join(lines)
