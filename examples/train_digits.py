"""Train a small CNN on scikit-learn's handwritten digits (shipped with it, no download),
once with FusedMixedPrecisionSGD and once with the torch.optim loop that does the same job
(FP32 masters, dynamic loss scaling, clip_grad_norm_, SGD). FP16 weights on a GPU,
BF16 on the CPU. Prints both loss curves and the time per optimizer step, and plots them.

    python examples/train_digits.py [--steps 300] [--device cuda] [--plot digits.png]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fused_opt import FusedMixedPrecisionSGD
from fused_opt.bench.contenders import TorchPipeline

HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
MAX_NORM, INIT_SCALE = 1.0, 2.0**12


def digits(device):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    return x.to(device), y.to(device)


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(kind: str, steps: int, device: torch.device, dtype: torch.dtype, batch: int = 64, seed: int = 0):
    """Returns (losses per step, seconds per optimizer step, final accuracy)."""
    torch.manual_seed(seed)
    model = cnn().to(device=device, dtype=dtype)
    params = list(model.parameters())
    if kind == "fused_opt":
        opt = FusedMixedPrecisionSGD(params, max_grad_norm=MAX_NORM, init_scale=INIT_SCALE, **HYPER)
    else:
        opt = TorchPipeline(params, "foreach", max_norm=MAX_NORM, init_scale=INIT_SCALE, **HYPER)
    x, y = digits(device)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    losses, step_times = [], []
    for step in range(steps):
        idx = order[(step * batch) % len(y):][:batch].to(device)
        loss = F.cross_entropy(model(x[idx].to(dtype)).float(), y[idx])  # the loss in FP32
        for p in params:
            p.grad = None
        opt.scale_loss(loss).backward()
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        step_times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        accuracy = float((model(x.to(dtype)).argmax(1) == y).float().mean())
    return losses, sorted(step_times)[len(step_times) // 2], accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", default="examples/digits_loss.png")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    runs = {kind: train(kind, args.steps, device, dtype) for kind in ("fused_opt", "torch.optim")}
    print(f"{args.steps} steps on {device} with {str(dtype).replace('torch.', '')} weights")
    for kind, (losses, step_s, accuracy) in runs.items():
        tail = sum(losses[-20:]) / len(losses[-20:])
        print(f"{kind:12s} final loss {tail:.4f}  accuracy {accuracy:.3f}  optimizer step {step_s * 1e3:.3f} ms")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        for kind, (losses, _, _) in runs.items():
            plt.plot(losses, label=kind, alpha=0.8)
        plt.xlabel("step")
        plt.ylabel("cross-entropy")
        plt.legend()
        plt.title(f"digits CNN, {dtype} weights on {device}")
        plt.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")
    except ImportError:
        pass
    return runs


if __name__ == "__main__":
    main()
