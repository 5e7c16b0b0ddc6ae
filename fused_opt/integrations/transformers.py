"""transformers: `FusedTrainer(model, args, ..., optimizers=(opt, scheduler))` in place of
`Trainer`: its accelerator is patched (fused_opt.integrations.accelerate), so backward uses
our loss scale, `args.max_grad_norm` is applied by the fused clipping on the unscaled norm,
the logged `grad_norm` is our unscaled one, and a skipped step does not advance the lr
scheduler (the Trainer asks `accelerator.optimizer_step_was_skipped`)."""
from __future__ import annotations

from transformers import Trainer

from .accelerate import patch


class FusedTrainer(Trainer):
    def create_accelerator_and_postprocess(self):
        result = super().create_accelerator_and_postprocess()
        patch(self.accelerator)
        return result
