"""Where people train: Lightning, transformers.Trainer, accelerate and
torch.compile, with the built-in loss scale and clipping, against torch.optim.SGD in the same
framework; the old silent failure (a framework's clipping on our scaled grads) now raises.

Small models on the CPU: scikit-learn's digits (bundled, no download) and a tiny random GPT-2."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fused_opt
from harness import BACKEND_DEVICE_IDS, BACKEND_DEVICES


def digits(n=512):
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


# -- the guard and the defaults, without a framework -----------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_clipping_scaled_grads_outside_the_optimizer_raises(backend, device):
    model = mlp().to(device).half()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, backend=backend)
    x, y = digits(32)
    loss = nn.functional.cross_entropy(model(x.to(device).half()).float(), y.to(device))
    opt.scale_loss(loss).backward()
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # on grads 65536 times too large
    with pytest.raises(RuntimeError, match="modified in place between backward and step"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_guard_allows_accumulation_and_can_be_turned_off():
    x, y = digits(32)
    for check in (True, False):
        model = mlp().half()
        opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, check_scaled_grads=check)
        for chunk in (slice(0, 16), slice(16, 32)):  # two micro-batches accumulate in place: fine
            opt.scale_loss(nn.functional.cross_entropy(model(x[chunk].half()).float(), y[chunk])).backward()
        if not check:
            for p in model.parameters():
                p.grad.mul_(0.5)  # scale-independent: allowed when asked
        opt.step()
        assert not bool(opt.last_step_skipped)


def test_loss_scale_auto_fits_the_dtype():
    def mode(dtype):
        opt = fused_opt.FusedMixedPrecisionSGD(mlp().to(dtype).parameters(), lr=0.1)
        return opt._scaler.dynamic, opt._scaler.enabled
    assert mode(torch.float16) == (True, True)
    assert mode(torch.bfloat16) == (False, False)
    assert mode(torch.float32) == (False, False)
    explicit = fused_opt.FusedMixedPrecisionSGD(mlp().to(torch.bfloat16).parameters(), loss_scale=128.0)
    assert float(explicit.loss_scale) == 128.0


def test_clip_grad_norm_routes_to_the_fused_clip():
    model = mlp().half()
    ref_model = mlp().half()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1)
    ref = fused_opt.FusedMixedPrecisionSGD(ref_model.parameters(), lr=0.1, max_grad_norm=0.25)
    x, y = digits(32)
    for m, o in ((model, opt), (ref_model, ref)):
        o.scale_loss(nn.functional.cross_entropy(m(x.half()).float(), y)).backward()
    norm = opt.clip_grad_norm_(0.25)
    opt.step()
    ref.step()
    assert norm is opt.last_grad_norm and float(norm) == float(ref.last_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


# -- torch.compile -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("what", ["train step", "opt.step", "adamw train step"])
def test_compiled_equals_eager_bit_for_bit(backend, device, dtype, what):
    def run(compiled):
        torch._dynamo.reset()
        model = mlp().to(device=device, dtype=dtype)
        if what.startswith("adamw"):
            opt = fused_opt.FusedMixedPrecisionAdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5, backend=backend)
        else:
            opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=0.5,
                                                   backend=backend)
        x, y = digits(64)
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        step = torch.compile(opt.step) if compiled and what == "opt.step" else opt.step

        def train_step():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.scale_loss(loss).backward()
            step()
            return loss
        fn = torch.compile(train_step) if compiled and what.endswith("train step") else train_step
        for _ in range(4):
            fn()
        return [t.detach().clone() for p in model.parameters() for t in (p, opt.state[p]["master_param"])]
    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


# -- Lightning ---------------------------------------------------------------------------------------

def _lightning_run(optimizer_fn, precision=None, plugins=None, clip=1.0, steps=40, manual=False, backward_hook=None):
    L = pytest.importorskip("lightning.pytorch")
    x, y = digits()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.automatic_optimization = not manual
            self.losses = []

        def training_step(self, batch, _):
            xb, yb = batch
            loss = nn.functional.cross_entropy(self.net(xb).float(), yb)
            self.losses.append(float(loss))
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
                return None
            return loss

        def configure_optimizers(self):
            return optimizer_fn(self.parameters())

        if backward_hook is not None:
            def backward(self, loss, *args, **kwargs):
                backward_hook(self, loss)

    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=False)
    kwargs = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    if not manual:
        kwargs["gradient_clip_val"] = clip
    if plugins is not None:
        kwargs["plugins"] = plugins
    else:
        kwargs["precision"] = precision
    L.Trainer(**kwargs).fit(module, loader)
    return module.losses


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_fused_precision_trains_like_torch_sgd(precision, manual):
    from fused_opt.integrations.lightning import FusedPrecision
    ours = _lightning_run(lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.05, momentum=0.9),
                          plugins=[FusedPrecision(precision)], manual=manual)
    theirs = _lightning_run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), precision="32-true", manual=manual)
    assert ours[-1] < 0.5 * ours[0]
    assert close_losses(ours, theirs)


def test_lightning_fused_precision_trains_adamw_like_torch_adamw():
    from fused_opt.integrations.lightning import FusedPrecision
    ours = _lightning_run(lambda ps: fused_opt.FusedMixedPrecisionAdamW(ps, lr=3e-3),
                          plugins=[FusedPrecision("bf16-true")])
    theirs = _lightning_run(lambda ps: torch.optim.AdamW(ps, lr=3e-3), precision="32-true")
    assert ours[-1] < 0.5 * ours[0]
    assert close_losses(ours, theirs)


def test_lightning_fused_mixed_precision_fp32_weights_clip_and_ema():
    """FP32 weights under bf16 autocast (precision="bf16-mixed"): FusedMixedPrecision routes
    gradient_clip_val into the step (Lightning's own MixedPrecision refuses clipping with an
    optimizer that unscales in its step), and the optimizer's EMA follows the weights."""
    from fused_opt.integrations.lightning import FusedMixedPrecision
    made = []

    clips = []

    def make(ps):
        opt = fused_opt.FusedMixedPrecisionSGD(ps, lr=0.05, momentum=0.9, ema_decay=0.9)
        fused_clip = opt.clip_grad_norm_
        opt.clip_grad_norm_ = lambda *a, **k: clips.append(a) or fused_clip(*a, **k)
        made.append(opt)
        return opt
    ours = _lightning_run(make, plugins=[FusedMixedPrecision("bf16-mixed", "cpu")])
    theirs = _lightning_run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), precision="bf16-mixed")
    assert ours[-1] < 0.5 * ours[0]
    assert close_losses(ours, theirs)
    opt = made[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in params)
    assert clips == [(1.0,)] * 40  # gradient_clip_val, every step, into the fused step
    emas = opt.ema_params()
    assert all(not torch.equal(e, p.detach()) for e, p in zip(emas, params) if p.numel() > 1)
    with opt.swap_ema():
        assert all(torch.equal(e, p.detach()) for e, p in zip(emas, params))


def test_lightning_swap_ema_validates_on_the_ema_and_checkpoints_the_weights(tmp_path):
    """SwapEMA: validation steps see the EMA in the params; checkpoints written after
    validation hold the trained weights, and the EMA in the optimizer's state."""
    L = pytest.importorskip("lightning.pytorch")
    from fused_opt.integrations.lightning import FusedMixedPrecision, SwapEMA
    x, y = digits()
    seen = []

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.net(batch[0]).float(), batch[1])

        def validation_step(self, batch, _):
            opt = self.trainer.optimizers[0].optimizer if hasattr(self.trainer.optimizers[0], "optimizer") \
                else self.trainer.optimizers[0]
            seen.append(all(torch.equal(p, e) for p, e in zip(self.parameters(), opt.ema_params())))
            self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]).float(), batch[1]))

        def configure_optimizers(self):
            return fused_opt.FusedMixedPrecisionSGD(self.parameters(), lr=0.05, momentum=0.9, ema_decay=0.9)

    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:128], y[:128]), batch_size=64)
    trainer = L.Trainer(max_steps=20, val_check_interval=5, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        default_root_dir=tmp_path, plugins=[FusedMixedPrecision("bf16-mixed", "cpu")],
                        callbacks=[SwapEMA(), L.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")])
    trainer.fit(module, loader, val)
    assert seen and all(seen)
    opt = trainer.optimizers[0]
    assert not all(torch.equal(p, e) for p, e in zip(module.parameters(), opt.ema_params()))
    saved = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert "ema_param" in saved["optimizer_states"][0]["state"][0]


def close_losses(ours, theirs, last=10, rel=0.1) -> bool:
    """The same run in FP16/BF16 against FP32: the mean of the last losses within 10 %."""
    a, b = sum(ours[-last:]) / last, sum(theirs[-last:]) / last
    return abs(a - b) / b < rel


def test_lightning_clipping_on_scaled_grads_now_raises():
    """The "obvious glue" of before: backward scaled by hand, Lightning's own clipping on it."""
    def scaled_backward(module, loss):
        module.trainer.optimizers[0].scale_loss(loss).backward()
    with pytest.raises(RuntimeError, match="modified in place between backward and step"):
        _lightning_run(lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.2), precision="16-true",
                       backward_hook=scaled_backward, steps=3)


# -- accelerate ---------------------------------------------------------------------------------------

def _accelerate_run(make_opt, dtype, patch, clip=1.0, steps=40, inject_inf_at=None):
    accelerate = pytest.importorskip("accelerate")
    from fused_opt.integrations.accelerate import patch as fused_patch
    accelerator = accelerate.Accelerator(cpu=True)
    if patch:
        fused_patch(accelerator)
    model = mlp().to(dtype)
    x, y = digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.to(dtype), y), batch_size=64)
    model, opt, loader = accelerator.prepare(model, make_opt(model.parameters()), loader)
    losses, skipped = [], []
    step = 0
    while step < steps:
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb).float(), yb)
            losses.append(float(loss))
            opt.zero_grad()
            accelerator.backward(loss)
            if step == inject_inf_at:  # a new grad tensor: the guard refuses in-place edits of scaled grads
                p = next(model.parameters())
                p.grad = p.grad.clone()
                p.grad.view(-1)[0] = math.inf
            accelerator.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            skipped.append(accelerator.optimizer_step_was_skipped)
            step += 1
            if step == steps:
                break
    return losses, skipped, opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_accelerate_patch_trains_like_torch_sgd(dtype):
    ours, skipped, opt = _accelerate_run(lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.05, momentum=0.9),
                                         dtype, patch=True)
    theirs, _, _ = _accelerate_run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), torch.float32, patch=False)
    assert not any(skipped) and close_losses(ours, theirs)
    # through the AcceleratedOptimizer wrapper: our attributes, and a skipped step reported
    assert float(opt.last_grad_norm) > 0 and opt.scale_loss is not None and opt.loss_scale is not None
    _, skipped, _ = _accelerate_run(lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.05), dtype, patch=True,
                                    steps=8, inject_inf_at=5)
    assert skipped == [False] * 5 + [True] + [False] * 2


def test_accelerate_patch_trains_adamw_like_torch_adamw():
    ours, skipped, _ = _accelerate_run(lambda ps: fused_opt.FusedMixedPrecisionAdamW(ps, lr=3e-3), torch.float16,
                                       patch=True)
    theirs, _, _ = _accelerate_run(lambda ps: torch.optim.AdamW(ps, lr=3e-3), torch.float32, patch=False)
    assert not any(skipped) and close_losses(ours, theirs)


def test_accelerate_without_the_patch_refuses_clipping_scaled_grads():
    def glue(ps):
        return fused_opt.FusedMixedPrecisionSGD(ps, lr=0.2)
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = mlp().half()
    model, opt = accelerator.prepare(model, glue(model.parameters()))
    x, y = digits(64)
    fused = opt.optimizer
    accelerator.backward(fused.scale_loss(nn.functional.cross_entropy(model(x.half()).float(), y)))
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()


# -- transformers.Trainer ------------------------------------------------------------------------------

def _gpt2(dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config).to(dtype)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=256, length=16):
        gen = torch.Generator().manual_seed(0)
        base = torch.randint(0, 16, (n, 1), generator=gen)
        self.ids = (base + torch.arange(length)) % 64  # learnable: each token follows the last

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_run(trainer_cls, model, opt, tmp_path, max_grad_norm=1.0, steps=30):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=32,
                                          use_cpu=True, logging_steps=1, report_to=[], save_strategy="no",
                                          max_grad_norm=max_grad_norm, disable_tqdm=True, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = trainer_cls(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [entry["loss"] for entry in logs], [entry.get("grad_norm") for entry in logs]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_hf_fused_trainer_trains_like_torch_sgd(dtype, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fused_opt.integrations.transformers import FusedTrainer
    model = _gpt2(dtype)
    ours, norms = _hf_run(FusedTrainer, model, fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.5,
                                                                                 momentum=0.9), tmp_path / "a")
    ref_model = _gpt2(torch.float32)
    theirs, ref_norms = _hf_run(transformers.Trainer, ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.5,
                                                                                 momentum=0.9), tmp_path / "b")
    assert ours[-1] < 0.8 * ours[0]
    assert abs(ours[-1] - theirs[-1]) / theirs[-1] < 0.1
    # the logged norm is the unscaled one: close to torch's, not 65536 times it
    assert norms[0] == pytest.approx(ref_norms[0], rel=0.05)


def test_hf_fused_trainer_trains_adamw_like_torch_adamw(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fused_opt.integrations.transformers import FusedTrainer
    model = _gpt2(torch.bfloat16)
    ours, _ = _hf_run(FusedTrainer, model, fused_opt.FusedMixedPrecisionAdamW(model.parameters(), lr=3e-3),
                      tmp_path / "a")
    ref_model = _gpt2(torch.float32)
    theirs, _ = _hf_run(transformers.Trainer, ref_model, torch.optim.AdamW(ref_model.parameters(), lr=3e-3),
                        tmp_path / "b")
    assert ours[-1] < 0.8 * ours[0]
    assert abs(ours[-1] - theirs[-1]) / theirs[-1] < 0.1


def test_hf_trainer_clipping_on_scaled_grads_now_raises(tmp_path):
    """The obvious glue of before (scale in the accelerator's backward, Trainer's own clipping):
    it trained nothing silently; now the step raises."""
    transformers = pytest.importorskip("transformers")

    class Glued(transformers.Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            backward = self.accelerator.backward
            self.accelerator.backward = lambda loss, **kw: backward(self.optimizer.optimizer.scale_loss(loss), **kw)
    model = _gpt2(torch.float16)
    with pytest.raises(RuntimeError, match="modified in place"):
        _hf_run(Glued, model, fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.5), tmp_path, steps=2)


# -- flat_grads=True inside the frameworks ----------------------------------------------------------

def test_flat_grads_in_lightning_accelerate_and_hf(tmp_path):
    """Each framework's own zero_grad path: Lightning's and accelerate's call the optimizer's
    (the fast step runs); HF Trainer's calls model.zero_grad() (the grads are freed every
    step, so flat grads give up and every step is the exact per-tensor one). All train as
    torch's SGD does."""
    from fused_opt.integrations.lightning import FusedPrecision
    made = []

    def flat(ps, **kw):
        made.append(fused_opt.FusedMixedPrecisionSGD(ps, flat_grads=True, **kw))
        return made[-1]
    ours = _lightning_run(lambda ps: flat(ps, lr=0.05, momentum=0.9), plugins=[FusedPrecision("bf16-true")])
    theirs = _lightning_run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), precision="32-true")
    assert close_losses(ours, theirs) and made[-1].flat_grads_status == "active"
    ours, skipped, opt = _accelerate_run(lambda ps: flat(ps, lr=0.05, momentum=0.9), torch.float16, patch=True)
    theirs, _, _ = _accelerate_run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), torch.float32, patch=False)
    assert not any(skipped) and close_losses(ours, theirs) and made[-1].flat_grads_status == "active"
    transformers = pytest.importorskip("transformers")
    from fused_opt.integrations.transformers import FusedTrainer
    model = _gpt2(torch.bfloat16)
    ours, _ = _hf_run(FusedTrainer, model, flat(model.parameters(), lr=0.5, momentum=0.9), tmp_path / "a")
    ref_model = _gpt2(torch.float32)
    theirs, _ = _hf_run(transformers.Trainer, ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.5, momentum=0.9),
                        tmp_path / "b")
    assert abs(ours[-1] - theirs[-1]) / theirs[-1] < 0.1
    assert made[-1].flat_grads_status.startswith("off: .grad was replaced")


# -- several optimizers (a GAN) under the integrations; clipping a sub-module ---------------------

def _gan_run(precision, make_opt, scale_each=False, steps=6):
    """A two-optimizer module trained with manual optimization under FusedPrecision."""
    L = pytest.importorskip("lightning.pytorch")
    from fused_opt.integrations.lightning import FusedPrecision
    x, y = digits(256)

    class GAN(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.gen, self.disc = mlp(), mlp()
            self.automatic_optimization = False

        def training_step(self, batch, _):
            xb, yb = batch
            for opt, net in zip(self.optimizers(), (self.gen, self.disc)):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(xb).float(), yb)
                self.manual_backward(opt.scale_loss(loss) if scale_each else loss)
                opt.step()

        def configure_optimizers(self):
            return [make_opt(self.gen.parameters()), make_opt(self.disc.parameters())]

    module = GAN()
    before = [p.detach().clone() for p in module.parameters()]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              plugins=[FusedPrecision(precision)]).fit(module, loader)
    return before, [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_lightning_two_optimizers_without_a_loss_scale_train(precision):
    # Two torch.optim.SGD train under the plugin; so do two of ours built with loss_scale=None.
    for make_opt in (lambda ps: torch.optim.SGD(ps, lr=0.05),
                     lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.05, loss_scale=None)):
        before, after = _gan_run(precision, make_opt)
        assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_lightning_two_optimizers_with_loss_scales_say_what_to_do():
    def make_opt(ps):
        return fused_opt.FusedMixedPrecisionSGD(ps, lr=0.05, init_scale=2.0**8)
    with pytest.raises(RuntimeError, match=r"self.manual_backward\(opt.scale_loss\(loss\)\)"):
        _gan_run("16-true", make_opt)
    before, after = _gan_run("16-true", make_opt, scale_each=True)  # as the message says: trains
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_accelerate_two_optimizers_and_a_clipped_sub_module():
    # Two of ours with loss_scale=None under the patch train like two torch.optim.SGD; the
    # clip of one sub-module equals torch's clip_grad_norm_ on it (FP32 params, scaled loss).
    accelerate = pytest.importorskip("accelerate")
    from fused_opt.integrations.accelerate import patch
    x, y = digits(64)

    def run(ours):
        accelerator = accelerate.Accelerator(cpu=True)
        if ours:
            patch(accelerator)
        torch.manual_seed(0)
        gen, disc = mlp(), mlp()
        make = (lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.05, loss_scale=1024.0)) if ours else \
            (lambda ps: torch.optim.SGD(ps, lr=0.05))
        gen, disc, opt_g, opt_d = accelerator.prepare(gen, disc, make(gen.parameters()), make(disc.parameters()))
        norms = []
        for _ in range(3):
            for opt, net in ((opt_g, gen), (opt_d, disc)):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x), y)
                accelerator.backward(opt.scale_loss(loss) if ours else loss)
                norms.append(accelerator.clip_grad_norm_(net[2].parameters(), 0.05))
                opt.step()
        return [p.detach().clone() for m in (gen, disc) for p in m.parameters()], torch.stack(norms)

    (ours, our_norms), (theirs, their_norms) = run(True), run(False)
    torch.testing.assert_close(our_norms, their_norms, rtol=1e-5, atol=0)
    assert bool((their_norms > 0.05).all())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- what a forgotten scale_loss says -----------------------------------------------------------------

def test_a_second_step_after_one_backward_names_the_real_cause():
    model = mlp().half()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1, init_scale=2.0**8)
    x, y = digits(32)
    opt.scale_loss(nn.functional.cross_entropy(model(x.half()).float(), y)).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="step\\(\\) again without a new backward"):
        opt.step()


@pytest.mark.parametrize("caller", [None, "lightning.pytorch.loops.optimization", "transformers.trainer",
                                    "accelerate.optimizer"])
def test_a_missing_scale_loss_names_the_integration_to_use(caller):
    model = mlp().half()
    opt = fused_opt.FusedMixedPrecisionSGD(model.parameters(), lr=0.1)
    x, y = digits(32)
    nn.functional.cross_entropy(model(x.half()).float(), y).backward()
    # the framework's frame on the stack, as when its loop calls step()
    namespace = {"__name__": caller or "user_script", "opt": opt}
    exec("def call_step():\n    opt.step()\n", namespace)
    with pytest.raises(RuntimeError) as raised:
        namespace["call_step"]()
    message = str(raised.value)
    expected = {None: "Call opt.scale_loss(loss).backward()", "lightning.pytorch.loops.optimization": "FusedPrecision",
                "transformers.trainer": "FusedTrainer", "accelerate.optimizer": "patch(accelerator)"}[caller]
    assert expected in message
    assert "no equal fix for FP16 params" in message and "loss_scale=None turns scaling off" not in message


def test_lightning_without_the_plugin_is_told_to_use_it():
    with pytest.raises(RuntimeError, match="FusedPrecision"):
        _lightning_run(lambda ps: fused_opt.FusedMixedPrecisionSGD(ps, lr=0.05), precision="16-true", steps=2)
