"""accelerate with FP16 (or BF16) weights, the built-in loss scale and
`accelerator.clip_grad_norm_`: `fused_opt.integrations.accelerate.patch(accelerator)` is the
one line. Trains scikit-learn's digits with ours and with torch.optim.SGD on FP32 weights,
and prints both losses.

    python examples/accelerate_digits.py [--steps 60] [--dtype fp16|bf16]
"""
import argparse

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from torch import nn

from fused_opt import FusedMixedPrecisionSGD
from fused_opt.integrations.accelerate import patch


def run(make_optimizer, dtype, steps, fused):
    accelerator = Accelerator(cpu=True)
    if fused:
        patch(accelerator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=dtype), torch.tensor(y))
    model, opt, loader = accelerator.prepare(model, make_optimizer(model.parameters()),
                                             torch.utils.data.DataLoader(data, batch_size=64))
    losses = []
    while len(losses) < steps:
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb).float(), yb)
            losses.append(float(loss))
            opt.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if len(losses) == steps:
                break
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = parser.parse_args(argv)
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    ours = run(lambda ps: FusedMixedPrecisionSGD(ps, lr=0.05, momentum=0.9), dtype, args.steps, fused=True)
    theirs = run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), torch.float32, args.steps, fused=False)
    print(f"final loss, mean of the last 10 steps: fused_opt {sum(ours[-10:]) / 10:.4f}, "
          f"torch.optim.SGD {sum(theirs[-10:]) / 10:.4f}")
    return ours, theirs


if __name__ == "__main__":
    main()
