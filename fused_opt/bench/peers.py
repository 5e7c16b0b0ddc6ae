"""Other libraries' optimizers as contenders: torchao's low-bit AdamW, bitsandbytes' 8-bit
optimizers, optimi (Kahan summation), HeavyBall (torch.compile'd, with its `ecc` corrections),
FlashOptim and Transformer Engine's FusedAdam.

Each peer steps its own BF16 params (no 16-bit loss scale: these libraries have none) with
the model's grads unscaled, after `clip_grad_norm_` as its users clip, and is timed paired
with the configuration of ours that stores the same kind of thing (8-bit state with our int8
state, 24-bit or Kahan/stochastically rounded weights with our 24-bit masters, "remainder8").
A peer that is not installed, or cannot run on this device, is listed with the reason."""
from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Callable

import torch

from .contenders import HYPER, Ours

# Ours does loss scale, inf skip and the global clip in every paired row; `lacks` names what a peer leaves out.
CLIP_BY_TORCH = "clip by torch's clip_grad_norm_ (2 more passes, timed in the row)"


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    package: str  # the distribution whose version the record carries
    optimizer: str  # "sgd" | "adamw"
    ours: tuple  # (master_weights, state_precision) of the paired configuration of ours
    stores: str  # what it keeps per param, in words
    lacks: str  # what ours does in the row that this peer does not
    make: Callable  # (params, **torch-style hyperparameters) -> optimizer
    cuda_only: str | None = None  # why it cannot run on a CPU, when it cannot
    default: bool = False  # in the default (short) run
    # Workloads with more tensors are left out: its torch.compile'd step compiles for minutes
    max_tensors: int | None = None


# Each builder takes torch.optim-style hyperparameters (lr, momentum, betas, weight_decay) and
# passes them under the peer's own names, with the peer's options that make it the row's format.
def _torchao(cls: str):
    def make(params, lr, betas=(0.9, 0.999), weight_decay=0.0):
        from torchao import optim
        return getattr(optim, cls)(params, lr=lr, betas=betas, weight_decay=weight_decay, bf16_stochastic_round=True)
    return make


def _bnb(cls: str):
    def make(params, **hyper):
        import bitsandbytes as bnb
        # min_8bit_size=0: every tensor in 8 bits, the small ones too (its default keeps
        # tensors under 4,096 elements in FP32, which the 8-bit rows would not be comparing)
        return getattr(bnb.optim, cls)(params, **hyper, min_8bit_size=0)
    return make


def _optimi(cls: str):
    def make(params, **hyper):
        import optimi
        extra = {} if cls == "SGD" else dict(eps=1e-8)  # torch's eps (optimi's default is 1e-6)
        return getattr(optimi, cls)(params, **hyper, **extra, kahan_sum=True, foreach=True)
    return make


def _heavyball(cls: str):
    def make(params, lr, momentum=None, **hyper):
        import heavyball
        if momentum is not None:
            hyper["beta"] = momentum
        # "bf16+8": BF16 values with an int8 correction each (24 bits), for the state (ecc) and the
        # weights (param_ecc). Its compiled step is one graph over every tensor, whose compile grows
        # faster than the tensor count (on a 2-core CPU: 161 tensors 5 minutes, 66 more than 8), so
        # on a CPU it runs eagerly (its own option); even so its first step compiles its helpers for
        # minutes (2 on a 66-tensor sweep), so it is left out of workloads of more tensors.
        return getattr(heavyball, cls)(params, lr=lr, **hyper, ecc="bf16+8", param_ecc="bf16+8",
                                       compile_step=params[0].is_cuda)
    return make


def _flashoptim(cls: str):
    def make(params, **hyper):
        import flashoptim
        return getattr(flashoptim, cls)(params, **hyper, master_weight_bits=24)
    return make


def _te(params, **hyper):
    from transformer_engine.pytorch.optimizers import FusedAdam
    return FusedAdam(params, **hyper, adam_w_mode=True, master_weights=True, master_weight_dtype=torch.int16,
                     exp_avg_dtype=torch.uint8, exp_avg_sq_dtype=torch.uint8)


NO_SCALE = f"loss scale, inf skip; {CLIP_BY_TORCH}"
PEERS = (
    Peer("optimi SGD (Kahan)", "torch-optimi", "sgd", ("remainder8", "bf16"),
         "BF16 weights, BF16 momentum, BF16 Kahan compensation", NO_SCALE,
         _optimi("SGD"), default=True),
    Peer("bitsandbytes SGD8bit", "bitsandbytes", "sgd", ("remainder8", "int8"),
         "BF16 weights (no master), 8-bit block-wise momentum", NO_SCALE, _bnb("SGD8bit")),
    Peer("HeavyBall SGD (ecc bf16+8; compiled on GPU)", "heavyball", "sgd", ("remainder8", "bf16"),
         "24-bit weights (BF16 + int8 correction), 24-bit momentum", NO_SCALE,
         _heavyball("SGD"), max_tensors=66),
    Peer("FlashOptim FlashSGD", "flashoptim", "sgd", ("remainder8", "int8"),
         "24-bit weights, int8 companded momentum", NO_SCALE, _flashoptim("FlashSGD"),
         cuda_only="its quantized state needs CUDA (NotImplementedError: Quantization requires a CUDA device)"),
    Peer("torchao AdamW8bit (BF16 SR)", "torchao", "adamw", ("remainder8", "int8"),
         "BF16 weights with stochastic rounding, 8-bit block-wise moments", NO_SCALE,
         _torchao("AdamW8bit"), default=True),
    Peer("torchao AdamW4bit (BF16 SR)", "torchao", "adamw", ("remainder8", "int8"),
         "BF16 weights with stochastic rounding, 4-bit block-wise moments", NO_SCALE, _torchao("AdamW4bit")),
    Peer("torchao AdamWFp8 (BF16 SR)", "torchao", "adamw", ("remainder8", "int8"),
         "BF16 weights with stochastic rounding, FP8 block-wise moments", NO_SCALE, _torchao("AdamWFp8")),
    Peer("bitsandbytes AdamW8bit", "bitsandbytes", "adamw", ("remainder8", "int8"),
         "BF16 weights (no master), 8-bit block-wise moments", NO_SCALE, _bnb("AdamW8bit")),
    Peer("optimi AdamW (Kahan)", "torch-optimi", "adamw", ("remainder8", "bf16"),
         "BF16 weights, BF16 moments, BF16 Kahan compensation", NO_SCALE,
         _optimi("AdamW")),
    Peer("HeavyBall AdamW (ecc bf16+8; compiled on GPU)", "heavyball", "adamw", ("remainder8", "bf16"),
         "24-bit weights (BF16 + int8 correction), 24-bit moments", NO_SCALE,
         _heavyball("AdamW"), max_tensors=66),
    Peer("FlashOptim FlashAdamW", "flashoptim", "adamw", ("remainder8", "int8"),
         "24-bit weights, int8 companded moments", NO_SCALE, _flashoptim("FlashAdamW"),
         cuda_only="its quantized state needs CUDA (NotImplementedError: Quantization requires a CUDA device)"),
    Peer("Transformer Engine FusedAdam", "transformer-engine", "adamw", ("remainder", "int8"),
         "BF16 weights + int16 master remainders, 8-bit moments (one scale per tensor)", NO_SCALE, _te,
         cuda_only="a CUDA extension: it neither builds nor runs without a GPU and the CUDA toolkit's libraries"),
)


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def why_not(peer: Peer, device: torch.device, tensors: int = 0) -> str | None:
    """None when `peer` can run here, else why not (not installed, CUDA only, or a compile
    too long for a workload of this many tensors)."""
    if peer.cuda_only and device.type != "cuda":
        return peer.cuda_only
    if version(peer.package) is None:
        return f"not installed (pip install {peer.package})"
    if peer.max_tensors is not None and tensors > peer.max_tensors:
        return f"left out above {peer.max_tensors} tensors: its first step compiles for minutes"
    return None


def selected(optimizer: str, full: bool) -> list:
    """The peers of a run: every one with --full, else those marked for the default run."""
    return [p for p in PEERS if p.optimizer == optimizer and (full or p.default)]


def held_bytes(params, state) -> float:
    """Bytes per param of the params and everything tensor-valued in `state` (nested dicts and
    lists, and the inner tensors of tensor subclasses such as torchao's 8-bit state), each
    storage counted once, from the storages themselves."""
    storages = {}

    def visit(x):
        if isinstance(x, torch.Tensor):
            inner = getattr(type(x), "__tensor_flatten__", None)
            if inner is not None and type(x) is not torch.nn.Parameter and type(x) is not torch.Tensor:
                names, _ = x.__tensor_flatten__()
                for name in names:
                    visit(getattr(x, name))
                return
            storage = x.untyped_storage()
            storages[(storage.data_ptr(), x.device)] = storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
    visit(list(params))
    visit(list(state))
    return sum(storages.values()) / sum(p.numel() for p in params)


class PeerContender:
    """A peer stepping its own BF16 params with a copy of the model's grads, unscaled (the
    model's are scaled for ours' loss scale), after clip_grad_norm_. The clip's max norm is out of reach so
    that grads shared by every call keep their values (the passes are the same)."""

    def __init__(self, model, peer: Peer):
        self.name = peer.name
        self.job = "step"
        self.peer = peer
        self.params = [torch.nn.Parameter(v.clone()) for v in model.values]
        # a copy of its own: optimi's foreach step adds the weight decay into the grads in place
        self.grads = [g.clone() for g in model.unscaled_grads()]
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.opt = peer.make(self.params, **HYPER[peer.optimizer])

    def step(self):
        if self.params[0].grad is None:  # HeavyBall frees the grads it has stepped
            for p, g in zip(self.params, self.grads):
                p.grad = g
        torch.nn.utils.clip_grad_norm_(self.params, 1e30, foreach=True)
        self.opt.step()

    def memory_per_param(self) -> float:
        return held_bytes(self.params, self.opt.state.values())


def paired_ours(model, peer: Peer, backend: str = "native") -> Ours:
    master, state = peer.ours
    return Ours(model, backend, peer.optimizer, master_weights=master, state_precision=state)


def moved_bytes(held: float, grad_bytes: int) -> float:
    """The least bytes per param a step moves, counted alike for every row of the peer table:
    what it holds (params and state) read and written once, the grads read twice (norm, update)."""
    return 2 * held + 2 * grad_bytes


def host_ops(fn) -> int:
    """Top-level operations one call dispatches on the host (torch ops, compiled graphs, and
    for ours its native step): what bounds a step of many small tensors."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None)
