"""transformers.Trainer with FP16 (or BF16) weights, the built-in loss scale and
`max_grad_norm`: `FusedTrainer` in place of `Trainer` is the one line. Trains a tiny random
GPT-2 (no download) on a learnable token sequence with ours and with torch.optim.SGD on FP32
weights, and prints both losses and the logged (unscaled) grad norms.

    python examples/hf_trainer_gpt2.py [--steps 40] [--dtype fp16|bf16]
"""
import argparse
import tempfile

import torch
import transformers

from fused_opt import FusedMixedPrecisionSGD
from fused_opt.integrations.transformers import FusedTrainer


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=256, length=16):
        base = torch.randint(0, 16, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (base + torch.arange(length)) % 64  # each token follows the last

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(trainer_cls, make_optimizer, dtype, steps):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    opt = make_optimizer(model.parameters())
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=32,
                                              use_cpu=True, logging_steps=1, report_to=[], save_strategy="no",
                                              max_grad_norm=1.0, disable_tqdm=True, seed=0)
        trainer = trainer_cls(model=model, args=args, train_dataset=Tokens(),
                              optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)))
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [e["loss"] for e in logs], [e.get("grad_norm") for e in logs]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = parser.parse_args(argv)
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    ours = run(FusedTrainer, lambda ps: FusedMixedPrecisionSGD(ps, lr=0.5, momentum=0.9), dtype, args.steps)
    theirs = run(transformers.Trainer, lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9), torch.float32, args.steps)
    print(f"final loss: fused_opt {ours[0][-1]:.4f}, torch.optim.SGD {theirs[0][-1]:.4f}; "
          f"first logged grad norm: {ours[1][0]:.4f} vs {theirs[1][0]:.4f}")
    return ours, theirs


if __name__ == "__main__":
    main()
