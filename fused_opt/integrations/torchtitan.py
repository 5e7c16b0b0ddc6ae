"""torchtitan: its OptimizersContainer with our optimizers registered by name.

torchtitan builds its optimizers from names ("Adam", "AdamW", "DistMuon") in
`OptimizersContainer`; `FusedOptimizersContainer` adds "FusedMixedPrecisionAdamW" and
"FusedMixedPrecisionSGD" and is otherwise torchtitan's own class: the same param-group
patterns, the same flat FQN-keyed state dicts for DCP, the same `init_optim_state`.
`fused_adamw(...)` is the one-line config, like torchtitan's `default_adamw`:

    from fused_opt.integrations.torchtitan import fused_adamw
    config.optimizer = fused_adamw(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                   master_weights="remainder8", state_precision="int8")

Everything the optimizer keeps (masters, state, the loss scale, the applied-step count the
EMA warm-up reads) is in the flat state dict torchtitan's checkpointer saves and loads. See
docs/recipes.md "torchtitan" for which torchtitan settings to use with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from ..optimizer import FusedMixedPrecisionAdamW, FusedMixedPrecisionSGD

FACTORIES = {"FusedMixedPrecisionAdamW": FusedMixedPrecisionAdamW, "FusedMixedPrecisionSGD": FusedMixedPrecisionSGD}


class FusedOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer, which also builds FusedMixedPrecisionAdamW and
    FusedMixedPrecisionSGD: name them in `ParamGroupConfig.optimizer_name`; their optimizer-wide
    keywords (max_grad_norm, loss_scale, master_weights, state_precision, ema_decay, ...) go in
    `optimizer_factory_kwargs_by_name[name]`."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name in FACTORIES:
            return FACTORIES[name]
        return OptimizersContainer._resolve_optimizer_factory(name)


def fused_adamw(lr: float = 8e-4, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                **pipeline) -> FusedOptimizersContainer.Config:
    """A container config with one catch-all FusedMixedPrecisionAdamW group (torchtitan's
    `default_adamw` defaults); `pipeline`: the optimizer-wide keywords (max_grad_norm,
    master_weights, state_precision, ema_decay, ...)."""
    name = "FusedMixedPrecisionAdamW"
    return FusedOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=name,
                                       optimizer_kwargs=dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))],
        optimizer_factory_kwargs_by_name={name: pipeline})
