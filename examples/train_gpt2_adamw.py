"""Train a small GPT-2-style decoder with BF16 weights, once with FusedMixedPrecisionAdamW and
once with the torch.optim loop that does the same job (FP32 master weights kept by hand,
clip_grad_norm_, torch.optim.AdamW on the masters, copied back to the BF16 weights). The data
is synthetic and learnable (each sequence counts up from a random start, with a random stride
per sequence), so nothing is downloaded. Prints both loss curves and the time per optimizer
step, and plots them.

    python examples/train_gpt2_adamw.py [--steps 200] [--device cuda] [--plot gpt2.png]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fused_opt import FusedMixedPrecisionAdamW
from fused_opt.bench.contenders import TorchPipeline
from fused_opt.bench.train import GPT2Style

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
MAX_NORM = 1.0
MODEL = dict(layers=2, d=64, heads=4, vocab=64, ctx=32)


def batch(step: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    start = torch.randint(0, MODEL["vocab"], (size, 1), generator=gen)
    stride = torch.randint(1, 4, (size, 1), generator=gen)
    ids = (start + stride * torch.arange(MODEL["ctx"] + 1)) % MODEL["vocab"]
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(kind: str, steps: int, device: torch.device, dtype=torch.bfloat16, size: int = 32):
    """Returns (losses per step, seconds per optimizer step)."""
    torch.manual_seed(0)
    model = GPT2Style(**MODEL).to(device=device, dtype=dtype)
    params = list(model.parameters())
    if kind == "fused_opt":
        opt = FusedMixedPrecisionAdamW(params, max_grad_norm=MAX_NORM, **HYPER)
    else:  # BF16 needs no loss scale: the pipeline's scale stays 1
        opt = TorchPipeline(params, "foreach", max_norm=MAX_NORM, init_scale=1.0, growth_interval=2**30,
                            optimizer="adamw", **HYPER)
    losses, step_times = [], []
    for step in range(steps):
        x, y = batch(step, size, device)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())  # the loss in FP32
        for p in params:
            p.grad = None
        opt.scale_loss(loss).backward()
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        step_times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return losses, sorted(step_times)[len(step_times) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", help="write the two loss curves to this PNG")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    runs = {"fused_opt": train("fused_opt", args.steps, device),
            "torch.optim": train("torch.optim", args.steps, device)}
    for name, (losses, step_s) in runs.items():
        curve = " ".join(f"{loss:.3f}" for loss in losses[:: max(1, len(losses) // 10)])
        print(f"{name:12s} loss {curve} | final {losses[-1]:.4f} | optimizer step {step_s * 1e3:.2f} ms (median)")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        for name, (losses, _) in runs.items():
            plt.plot(losses, label=name)
        plt.xlabel("step")
        plt.ylabel("loss")
        plt.title(f"GPT-2-style decoder, BF16 weights, AdamW ({device.type})")
        plt.legend()
        plt.savefig(args.plot, dpi=100)
    return runs


if __name__ == "__main__":
    main()
