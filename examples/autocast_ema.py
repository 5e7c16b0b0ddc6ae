"""FP32 weights under autocast, gradient clipping and a model EMA, as Ultralytics and timm
train: the torch loop (GradScaler, unscale_, clip_grad_norm_, SGD, update, an EMA update over
the params) next to the same loop with one fused step (`ema_decay=...`). Trains a small
BatchNorm CNN on scikit-learn's digits both ways from the same weights and data, prints each
loop's ms per iteration (the loops alternate batch by batch, so both see the same machine),
and the accuracy of each loop's EMA weights.

    python examples/autocast_ema.py [--steps 300] [--device cpu|cuda]
"""
import argparse
import copy
import math
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from fused_opt import FusedMixedPrecisionSGD

DECAY, TAU, CLIP = 0.999, 100.0, 10.0  # Ultralytics: 0.9999 and tau 2000 over much longer runs
HYPER = dict(lr=0.02, momentum=0.937, nesterov=True, weight_decay=5e-4)


def model_and_data(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
                          nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.SiLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).to(device)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return model, x.to(device), torch.tensor(y).to(device)


def batches(x, y, steps, size=64):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (size,), generator=gen).to(x.device)
        yield x[idx], y[idx]


def torch_loop(model, device, dtype):
    """GradScaler (FP16) + unscale_ + clip_grad_norm_ + SGD(fused) + an EMA of the params with
    Ultralytics' warm-up, updated on steps GradScaler applied. Returns (iteration, EMA)."""
    opt = torch.optim.SGD(model.parameters(), **HYPER, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = [p.detach().clone() for p in model.parameters()]
    updates = 0

    def iteration(xb, yb):
        nonlocal updates
        with torch.autocast(device.type, dtype=dtype):
            loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() >= scale:  # applied (a skipped step backs the scale off)
            updates += 1
            d = DECAY * (1 - math.exp(-updates / TAU))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - d)
    return iteration, ema


def fused_loop(model, device, dtype):
    """The same loop with the clip and the EMA inside the step. Returns (iteration, optimizer)."""
    opt = FusedMixedPrecisionSGD(model.parameters(), **HYPER, max_grad_norm=CLIP, ema_decay=DECAY, ema_warmup=TAU,
                                 loss_scale="dynamic" if dtype == torch.float16 else None)

    def iteration(xb, yb):
        with torch.autocast(device.type, dtype=dtype):
            loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        opt.scale_loss(loss).backward()
        opt.step()
    return iteration, opt


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    correct = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return correct


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    model, x, y = model_and_data(device)
    ours_model = copy.deepcopy(model)
    loops = {"torch": torch_loop(model, device, dtype), "fused": fused_loop(ours_model, device, dtype)}
    times = {name: [] for name in loops}
    for xb, yb in batches(x, y, args.steps):  # the two loops alternate, batch by batch
        for name, (iteration, _) in loops.items():
            start = time.perf_counter()
            iteration(xb, yb)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    ema, opt = loops["torch"][1], loops["fused"][1]
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)  # the torch loop's EMA weights, with the live BatchNorm statistics
    torch_acc = accuracy(model, x, y)
    with opt.swap_ema():
        fused_acc = accuracy(ours_model, x, y)
    half = args.steps // 2  # the second half: past warm-up and allocation
    ms = {name: 1e3 * sorted(t[half:])[len(t[half:]) // 2] for name, t in times.items()}
    print(f"{device.type}, {str(dtype).replace('torch.', '')} autocast, {args.steps} steps: "
          f"torch loop {ms['torch']:.2f} ms/iteration, EMA accuracy {torch_acc:.3f}; "
          f"fused_opt {ms['fused']:.2f} ms/iteration, EMA accuracy {fused_acc:.3f}")
    return dict(torch_ema=ema, fused_ema=opt.ema_params(), torch_accuracy=torch_acc, fused_accuracy=fused_acc,
                ms=ms)


if __name__ == "__main__":
    main()
