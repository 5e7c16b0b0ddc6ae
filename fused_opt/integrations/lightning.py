"""Lightning: `Trainer(plugins=[FusedPrecision("16-true")])` (or `"bf16-true"`) instead of
`precision="16-true"`.

The plugin converts the module to FP16/BF16 as Lightning's `HalfPrecision` does, multiplies
the loss by the optimizer's loss scale before backward (automatic and manual optimization;
the loss Lightning logs stays unscaled), and routes `gradient_clip_val` to the fused
clipping inside the step, on the unscaled norm. Value clipping on scaled grads would clip
at S times the threshold, so it raises.
"""
from __future__ import annotations

from lightning.pytorch.plugins.precision.half import HalfPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType

from . import scaled_loss, unwrap


class FusedPrecision(HalfPrecision):
    def backward(self, tensor, model, optimizer, *args, **kwargs):
        # automatic optimization names the optimizer; manual_backward(loss) does not
        optimizers = [optimizer] if optimizer is not None else model.trainer.optimizers
        loss = scaled_loss(optimizers, tensor, "self.manual_backward(opt.scale_loss(loss)), with opt one of "
                           "self.optimizers()")
        model.backward(loss, *args, **kwargs)

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM):
        fused = unwrap(optimizer)
        if fused is None or clip_val is None or clip_val <= 0:
            return super().clip_gradients(optimizer, clip_val or 0.0, gradient_clip_algorithm)
        if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            raise RuntimeError("FusedPrecision: gradient_clip_algorithm='value' on loss-scaled grads would clip at "
                               "the scale times the threshold; use gradient_clip_algorithm='norm' (fused into the step)")
        fused.clip_grad_norm_(clip_val)
