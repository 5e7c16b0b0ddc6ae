"""Lightning with FP16 (or BF16) weights, the built-in loss scale and gradient_clip_val:
`plugins=[FusedPrecision("16-true")]` is the one line. Trains scikit-learn's digits with ours
and with torch.optim.SGD under Lightning's own "16-mixed" AMP, and prints both losses.

    python examples/lightning_digits.py [--steps 60] [--precision 16-true|bf16-true]
"""
import argparse

import lightning.pytorch as L
import torch
from sklearn.datasets import load_digits
from torch import nn

from fused_opt import FusedMixedPrecisionSGD
from fused_opt.integrations.lightning import FusedPrecision


class Digits(L.LightningModule):
    def __init__(self, make_optimizer):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.make_optimizer = make_optimizer
        self.losses = []

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x).float(), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def run(make_optimizer, steps, **trainer_kwargs):
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    module = Digits(make_optimizer)
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              **trainer_kwargs).fit(module, torch.utils.data.DataLoader(data, batch_size=64))
    return module.losses


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", default="16-true", choices=["16-true", "bf16-true"])
    args = parser.parse_args(argv)
    ours = run(lambda ps: FusedMixedPrecisionSGD(ps, lr=0.05, momentum=0.9), args.steps,
               plugins=[FusedPrecision(args.precision)])
    theirs = run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), args.steps,
                 precision="bf16-mixed" if args.precision == "bf16-true" else "32-true")
    print(f"final loss, mean of the last 10 steps: fused_opt {sum(ours[-10:]) / 10:.4f}, "
          f"torch.optim.SGD {sum(theirs[-10:]) / 10:.4f}")
    return ours, theirs


if __name__ == "__main__":
    main()
