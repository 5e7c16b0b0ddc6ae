"""What a user sees before the first step: every option in the signature (inspect, help()),
editors' types for the pipeline keywords, and a misspelt keyword answered with the class and
the closest valid keyword, before anything is built."""
import inspect
import pydoc
import typing

import pytest
import torch

import fused_opt
from fused_opt import FusedMixedPrecisionAdamW, FusedMixedPrecisionSGD
from fused_opt.optimizer import FusedMixedPrecisionOptimizer
from fused_opt.options import PipelineOptions, pipeline_parameters

CLASSES = (FusedMixedPrecisionSGD, FusedMixedPrecisionAdamW)
PIPELINE = [p.name for p in pipeline_parameters(FusedMixedPrecisionOptimizer.__init__)]


def test_the_pipeline_keywords_are_defined_once_and_typed_for_editors():
    assert "max_grad_norm" in PIPELINE and "ema_model" in PIPELINE and len(PIPELINE) == 21
    assert list(typing.get_type_hints(PipelineOptions)) == PIPELINE  # same names, same order


@pytest.mark.parametrize("cls", CLASSES)
def test_signature_and_help_list_every_option(cls):
    sig = inspect.signature(cls)
    assert not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    names = list(sig.parameters)
    assert names[:2] == ["params", "lr"] and names[-len(PIPELINE):] == PIPELINE
    assert sig.parameters["max_grad_norm"].default is None and sig.parameters["loss_scale"].default == "auto"
    assert sig.parameters["ema_dtype"].default is torch.float32
    text = pydoc.render_doc(cls)
    for name in ("max_grad_norm", "loss_scale", "ema_decay", "ema_model", "state_precision", "flat_grads"):
        assert name in text
    # the rule's own keywords, as torch.optim's
    torch_cls = torch.optim.SGD if cls is FusedMixedPrecisionSGD else torch.optim.AdamW
    for name, p in inspect.signature(torch_cls).parameters.items():
        if name not in ("params", "lr"):
            assert name in sig.parameters, name


@pytest.mark.parametrize("cls, keyword, suggestion", [
    (FusedMixedPrecisionAdamW, "clip_grad_norm", "max_grad_norm"),
    (FusedMixedPrecisionAdamW, "max_norm", "max_grad_norm"),
    (FusedMixedPrecisionSGD, "max_norm", "max_grad_norm"),
    (FusedMixedPrecisionAdamW, "ema_tau", "ema_warmup"),
    (FusedMixedPrecisionSGD, "betas", "momentum"),
    (FusedMixedPrecisionAdamW, "momentum", "betas"),
    (FusedMixedPrecisionSGD, "nesterv", "nesterov"),
    (FusedMixedPrecisionAdamW, "weight_decy", "weight_decay"),
    (FusedMixedPrecisionSGD, "model", "ema_model"),
])
def test_a_misspelt_keyword_names_the_class_and_the_closest_keyword(cls, keyword, suggestion):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\) got an unexpected keyword argument '{keyword}'; "
                                        rf"did you mean '{suggestion}'\?$"):
        cls([p], **{keyword: 1})
    assert p.grad is None and torch.equal(p, torch.ones(3, dtype=torch.bfloat16))


def test_a_keyword_with_no_close_match_lists_the_valid_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'; it takes .*max_grad_norm"):
        FusedMixedPrecisionSGD([torch.nn.Parameter(torch.ones(1))], zzz=1)


def test_every_pipeline_keyword_reaches_the_optimizer():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = FusedMixedPrecisionAdamW([p], max_grad_norm=2.0, norm_type=float("inf"), backend="torch",
                                   ema_decay=0.5, ema_model=torch.nn.Linear(1, 1))
    assert opt.max_grad_norm == 2.0 and opt.norm_type == float("inf") and opt.backend == "torch"
    with pytest.raises(ValueError, match="ema_model=.*needs ema_decay"):
        FusedMixedPrecisionSGD([p], ema_model=torch.nn.Linear(1, 1))
