"""python -m fused_opt.bench --train: whole training iterations (forward + backward + the
optimizer), to answer what the fused step changes in a training iteration, not only in the
step.

Models (no downloads): a ResNet-style CNN and a GPT-2-style decoder (workloads.RESNET_STYLE,
GPT2_STYLE), at two batch sizes. Contenders, each on the same model and data:
  fused_opt            low-precision weights (FP16 on CUDA, BF16 on the CPU), our step
  torch AMP            FP32 weights, autocast to the same dtype, (GradScaler for FP16),
                       SGD(fused=True)
  torch masters        low-precision weights, FP32 masters by hand: grads copied to the
                       masters, clip_grad_norm_(foreach), SGD(fused=True), copy back
  fused_opt AMP        FP32 weights under autocast, as torch AMP, our step instead of
                       unscale_ + clip_grad_norm_ + step
  torch AMP + EMA      torch AMP, then a model EMA as timm's ModelEmaV3 updates it
                       (torch._foreach_lerp_ over the params)
  fused_opt AMP + EMA  fused_opt AMP with ema_decay: the EMA inside the step
All clip at 1.0 with momentum 0.9; the EMAs decay at 0.9998. Reported: ms per iteration, the
optimizer's share of it (the EMA included), and each fused_opt setup's iteration speedup
against the torch pipelines that do its job.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import fused_opt
from . import workloads
from .timing import device_name


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def resnet_style(widths, blocks_per_stage, classes, image):
    layers, cin = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()], widths[0]
    for i, width in enumerate(widths):
        for b in range(blocks_per_stage):
            layers.append(Block(cin, width, 2 if b == 0 and i > 0 else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class GPT2Style(nn.Module):
    def __init__(self, layers, d, heads, vocab, ctx):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((ctx, ctx), float("-inf")), 1), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        return self.head(self.norm(self.blocks(x, mask=self.mask[:t, :t].to(x.dtype), is_causal=True)))


def make(kind: str, device):
    torch.manual_seed(0)
    if kind == "ResNet-style CNN":
        cfg = workloads.RESNET_STYLE
        model = resnet_style(**cfg)

        def batch(n):
            return (torch.randn(n, 3, cfg["image"], cfg["image"], device=device),
                    torch.randint(0, cfg["classes"], (n,), device=device))

        def loss_fn(m, x, y):
            return nn.functional.cross_entropy(m(x).float(), y)
    else:
        cfg = workloads.GPT2_STYLE
        model = GPT2Style(**cfg)

        def batch(n):
            ids = torch.randint(0, cfg["vocab"], (n, cfg["ctx"] + 1), device=device)
            return ids[:, :-1], ids[:, 1:]

        def loss_fn(m, x, y):
            return nn.functional.cross_entropy(m(x).float().flatten(0, 1), y.flatten())
    return model.to(device), batch, loss_fn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


EMA_DECAY = 0.9998
# Each fused_opt setup against the torch pipelines that do the same job.
COMPARED = {"fused_opt": ("torch AMP", "torch masters"), "fused_opt AMP": ("torch AMP",),
            "fused_opt AMP + EMA": ("torch AMP + EMA",)}
CONTENDERS = ("fused_opt", "torch AMP", "torch masters", "fused_opt AMP", "torch AMP + EMA", "fused_opt AMP + EMA")


class Contender:
    """One training setup: `iteration(x, y)` returns the seconds its optimizer part took."""

    def __init__(self, name, kind, device, low):
        self.name, self.device = name, device
        model, _, self.loss_fn = make(kind, device)
        self.ema = None
        if name.startswith("torch AMP"):
            self.model = model
            self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
            self.scaler = torch.amp.GradScaler(device.type) if low == torch.float16 else None
            if name.endswith("+ EMA"):  # timm ModelEmaV3 (exclude_buffers=True): a copy of the weights
                self.ema = [p.detach().clone() for p in model.parameters()]
        elif name.startswith("fused_opt AMP"):
            self.model = model
            ema = dict(ema_decay=EMA_DECAY) if name.endswith("+ EMA") else {}
            self.opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.01, momentum=0.9, max_grad_norm=1.0,
                                                        loss_scale="dynamic" if low == torch.float16 else None, **ema)
        else:
            self.model = model.to(low)
            params = list(self.model.parameters())
            if name == "fused_opt":
                self.opt = fused_opt.FusedMixedPrecisionSGD(params, lr=0.01, momentum=0.9, max_grad_norm=1.0)
            else:
                self.params = params
                self.masters = [p.detach().float().clone().requires_grad_() for p in params]
                self.opt = torch.optim.SGD(self.masters, lr=0.01, momentum=0.9, fused=True)
                self.scale = 2.0**16 if low == torch.float16 else 1.0
        self.low = low

    def iteration(self, x, y) -> float:
        if self.name.startswith("torch AMP"):
            with torch.autocast(self.device.type, dtype=self.low):
                loss = self.loss_fn(self.model, x, y)
            self.opt.zero_grad()
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            _sync(self.device)
            start = time.perf_counter()
            if self.scaler:
                self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
            if self.scaler:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1.0 - EMA_DECAY)
        elif self.name.startswith("fused_opt AMP"):
            with torch.autocast(self.device.type, dtype=self.low):
                loss = self.loss_fn(self.model, x, y)
            self.opt.zero_grad()
            self.opt.scale_loss(loss).backward()
            _sync(self.device)
            start = time.perf_counter()
            self.opt.step()
        elif self.name == "fused_opt":
            loss = self.loss_fn(self.model, x.to(self.low) if x.is_floating_point() else x, y)
            self.opt.zero_grad()
            self.opt.scale_loss(loss).backward()
            _sync(self.device)
            start = time.perf_counter()
            self.opt.step()
        else:  # torch masters
            loss = self.loss_fn(self.model, x.to(self.low) if x.is_floating_point() else x, y)
            self.model.zero_grad()
            (loss * self.scale).backward()
            _sync(self.device)
            start = time.perf_counter()
            grads = [p.grad for p in self.params]
            for m in self.masters:
                if m.grad is None:
                    m.grad = torch.empty_like(m)
            torch._foreach_copy_([m.grad for m in self.masters], grads)
            found = torch.zeros(1, device=self.device)
            torch._amp_foreach_non_finite_check_and_unscale_([m.grad for m in self.masters], found,
                                                              torch.full((1,), 1.0 / self.scale, device=self.device))
            torch.nn.utils.clip_grad_norm_(self.masters, 1.0, foreach=True)
            self.opt.step()
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        _sync(self.device)
        return time.perf_counter() - start


def run(device, batches=(8, 32), repeats=5, only=None):
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    rows = []
    jobs = [(k, b) for k in ("ResNet-style CNN", "GPT-2-style decoder") for b in batches if only is None or only in k]
    for k, (kind, n) in enumerate(jobs, 1):
        print(f"[{k}/{len(jobs)}] {kind}, batch {n}", file=sys.stderr, flush=True)
        _, batch, _ = make(kind, device)
        x, y = batch(n)
        contenders = [Contender(name, kind, device, low) for name in CONTENDERS]
        params = sum(p.numel() for p in contenders[0].model.parameters())
        tensors = len(list(contenders[0].model.parameters()))
        times = {c.name: [] for c in contenders}
        for r in range(repeats + 2):  # interleaved, the first two rounds are warm-up
            for c in contenders:
                start = time.perf_counter()
                opt_s = c.iteration(x, y)
                total = time.perf_counter() - start
                if r >= 2:
                    times[c.name].append((total, opt_s))
        medians = {name: (statistics.median(t for t, _ in v), statistics.median(o for _, o in v))
                   for name, v in times.items()}
        for name, (total, opt_s) in medians.items():
            rows.append(dict(model=kind, batch=n, params=params, tensors=tensors, contender=name,
                             dtype=str(low).replace("torch.", ""), iteration_ms=total * 1e3, optimizer_ms=opt_s * 1e3,
                             optimizer_share=opt_s / total,
                             iteration_speedup_of_fused={other: medians[other][0] / total
                                                         for other in COMPARED[name]}
                             if name in COMPARED else None))
    return rows


def table(record) -> str:
    lines = [f"Device: {record['device']} | torch {record['torch']} | {record['date']} | commit {record.get('commit')}", "",
             "| model | params / tensors | batch | contender | ms/iteration | optimizer ms | optimizer share | fused_opt iteration speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        speedup = "" if r["iteration_speedup_of_fused"] is None else ", ".join(
            f"{v:.2f}x vs {k}" for k, v in r["iteration_speedup_of_fused"].items())
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M / {r['tensors']} | {r['batch']} | {r['contender']} "
                     f"({r['dtype']}) | {r['iteration_ms']:.1f} | {r['optimizer_ms']:.2f} | "
                     f"{100 * r['optimizer_share']:.0f}% | {speedup} |")
    return "\n".join(lines)


def main(args) -> None:
    import datetime
    from .__main__ import _commit
    device = torch.device(args.device)
    record = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "fused_opt": fused_opt.build_info(), "commit": _commit(),
              "rows": run(device, batches=(2, 4) if args.quick else (8, 32), repeats=2 if args.quick else args.repeats,
                          only=args.only)}
    text = table(record)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train-{record['device_type']}" + (f"-{args.only}".replace(" ", "_") if args.only else ""))
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {stem}.json, {stem}.md", file=sys.stderr)
