"""The keywords every fused optimizer takes besides its update rule's own, as editors,
`inspect.signature` and `help()` show them, and the error a keyword that is not one of them gets.

The pipeline keywords are defined once, with their defaults, by
FusedMixedPrecisionOptimizer.__init__; PipelineOptions gives editors their names and types
(`**pipeline: Unpack[PipelineOptions]`, PEP 692), and `with_pipeline_signature` gives each
optimizer class the full runtime signature: its own parameters, then the pipeline's.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Literal, TypedDict

import torch


class PipelineOptions(TypedDict, total=False):
    """What README's option table describes; defaults in FusedMixedPrecisionOptimizer.__init__."""
    max_grad_norm: float | None
    norm_type: float
    loss_scale: Literal["auto", "dynamic"] | float | None
    init_scale: float
    growth_factor: float
    backoff_factor: float
    growth_interval: int
    hysteresis: int
    hysteresis_mode: Literal["megatron", "consecutive"]
    min_scale: float | None
    max_scale: float | None
    master_weights: Literal["fp32", "remainder", "remainder8"]
    state_precision: Literal["fp32", "bf16", "int8"]
    ema_decay: float | None
    ema_dtype: torch.dtype
    ema_warmup: float | None
    ema_model: torch.nn.Module | None
    fp32_grad_accumulation: bool
    flat_grads: bool
    backend: Literal["auto", "native", "triton", "torch"]
    check_scaled_grads: bool


# Names other libraries use for an option here, and what a user passing them means.
SYNONYMS = {
    "clip_grad_norm": "max_grad_norm", "max_norm": "max_grad_norm", "clip_grad": "max_grad_norm",
    "grad_clip": "max_grad_norm", "gradient_clipping": "max_grad_norm", "max_grad_norm_": "max_grad_norm",
    "ema_tau": "ema_warmup", "tau": "ema_warmup", "model_ema_decay": "ema_decay", "ema": "ema_decay",
    "ema_beta": "ema_decay", "ema_model_decay": "ema_decay", "model": "ema_model",
    "scaler": "loss_scale", "grad_scaler": "loss_scale", "static_loss_scale": "loss_scale",
    "dynamic_loss_scale": "loss_scale", "initial_scale_power": "init_scale",
    "betas": "momentum", "beta1": "momentum", "momentum": "betas", "beta": "betas",
    "master_weight_dtype": "master_weights", "optim_bits": "state_precision",
}


def pipeline_parameters(base_init) -> list[inspect.Parameter]:
    """The pipeline's keyword-only parameters, defaults included, from their one definition."""
    return [p for p in inspect.signature(base_init).parameters.values() if p.kind is p.KEYWORD_ONLY]


def with_pipeline_signature(cls):
    """Class decorator: cls.__init__'s signature becomes its own parameters (without
    **pipeline) followed by every pipeline keyword, so help(cls) and editors' runtime
    introspection list them all."""
    base_init = cls.__mro__[1].__init__  # FusedMixedPrecisionOptimizer's
    own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in own}
    extra = [p for p in pipeline_parameters(base_init) if p.name not in names]
    cls.__init__.__signature__ = inspect.Signature([*own, *extra])
    cls.KEYWORDS = frozenset(p.name for p in [*own, *extra] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    cls.PIPELINE_KEYWORDS = frozenset(p.name for p in extra)
    return cls


def check_keywords(cls, pipeline: dict) -> None:
    """A keyword that is not cls's raises TypeError naming the class and the closest valid
    keyword, before anything is built."""
    for name in pipeline:
        if name in cls.PIPELINE_KEYWORDS:
            continue
        guess = SYNONYMS.get(name)
        if guess not in cls.KEYWORDS:
            close = difflib.get_close_matches(name, sorted(cls.KEYWORDS), n=1, cutoff=0.6)
            guess = close[0] if close else None
        hint = f"; did you mean {guess!r}?" if guess else f"; it takes {', '.join(sorted(cls.KEYWORDS))}"
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}{hint}")
