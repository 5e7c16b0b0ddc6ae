"""Lightning: `Trainer(plugins=[FusedPrecision("16-true")])` (or `"bf16-true"`) instead of
`precision="16-true"`; `Trainer(plugins=[FusedMixedPrecision("bf16-mixed")])` (or `"16-mixed"`)
instead of `precision="bf16-mixed"`, for FP32 weights under autocast.

FusedPrecision converts the module to FP16/BF16 as Lightning's `HalfPrecision` does;
FusedMixedPrecision keeps FP32 weights and runs the forward under autocast as Lightning's
`MixedPrecision` does, without its GradScaler (the optimizer keeps the loss scale: build it
with `loss_scale="dynamic"` for "16-mixed"). Both multiply the loss by the optimizer's loss
scale before backward (automatic and manual optimization; the loss Lightning logs stays
unscaled) and route `gradient_clip_val` to the fused clipping inside the step, on the
unscaled norm (Lightning's MixedPrecision refuses clipping with an optimizer that unscales
in its step). Value clipping on scaled grads would clip at S times the threshold, so it raises.

`Trainer(callbacks=[SwapEMA()])` validates and tests on the optimizer's EMA (`ema_decay=...`):
the params hold it from the start of each validation or test epoch to its end, and get
their own bits back before checkpoints are written.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision.amp import MixedPrecision
from lightning.pytorch.plugins.precision.half import HalfPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType

from . import scaled_loss, unwrap


class _FusedBackward:
    """The loss scaled by the fused optimizer, its clipping inside the step."""

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


class FusedPrecision(_FusedBackward, HalfPrecision):
    """FP16/BF16 weights ("16-true", "bf16-true")."""


class FusedMixedPrecision(_FusedBackward, MixedPrecision):
    """FP32 weights under autocast ("16-mixed", "bf16-mixed"), no GradScaler."""

    def __init__(self, precision: str = "bf16-mixed", device: str = "cuda"):
        super().__init__(precision, device)
        self.scaler = None  # the fused optimizer scales the loss and skips overflowing steps


class SwapEMA(Callback):
    """Validation and test epochs on the EMA of the (first) fused optimizer (`opt.swap_ema()`)."""

    def __init__(self):
        self._swap = None

    def _enter(self, trainer) -> None:
        fused = next((f for f in map(unwrap, trainer.optimizers) if f is not None and f._ema is not None), None)
        if fused is not None and self._swap is None:
            self._swap = fused.swap_ema()
            self._swap.__enter__()

    def _exit(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.__exit__(None, None, None)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._enter(trainer)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._exit()

    def on_test_epoch_start(self, trainer, pl_module):
        self._enter(trainer)

    def on_test_epoch_end(self, trainer, pl_module):
        self._exit()

    def on_exception(self, trainer, pl_module, exception):
        self._exit()
