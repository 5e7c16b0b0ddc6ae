"""python -m fused_opt.bench.quality: what compressed masters and state cost in training quality.

Small training runs with BF16 params, each under every combination of master format
(master_weights: fp32, remainder, remainder8) and state precision (state_precision: fp32, bf16,
int8), from the same initial weights on the same batches, against the FP32-master, FP32-state
run; plus torch.optim stepping the BF16 params with no master at all (clipped alike), the
failure the masters exist to prevent; and the other libraries' optimizers that run here
(peers.py) on the same BF16 params (--no-peers leaves them out). Every run but `spike` clips
the grad norm at 1.0:

  cnn    a small CNN on scikit-learn's 8x8 digits (1,397 for training, each batch with fresh
         Gaussian noise of std 0.5 so that the training loss does not go to 0; 400 held out),
         SGD (momentum 0.9, weight decay 5e-4)
  gpt    a small GPT-2-style decoder, character-level on Python's own standard library source,
         AdamW (weight decay 0.1)
  embed  a 4,096 x 64 embedding table and a linear head, tokens drawn Zipf-distributed (most
         rows are not looked up in a given step: their grads are 0, and their Adam state only
         decays), each token's label fixed at random and flipped in 20 % of draws, AdamW
  spike  embed without clipping, and every 50th step's loss 100x (a bad batch): what the
         moments do after an outlier
  muon   the gpt task with Muon on the hidden matrices and AdamW on the rest, against
         torch.optim.Muon + AdamW on an FP32 copy of the model (same init and batches)
  musgd  the cnn task with Ultralytics' MuSGD (Muon + SGD on the conv weights), against its
         step transcribed (bench/muon.py) on an FP32 copy of the model

The params, grads and optimizer are BF16 (what the optimizer sees is a BF16 model's); the
forward computes in FP32 from the BF16 weights (BF16 convolution and attention are slow on
CPUs without BF16 units, and the optimizer is what is being measured). Reported: each run's
loss curve, its final loss (the mean training loss over the last 100 steps) and that loss
relative to the reference run, and the loss on held-out data after the last step. Writes quality-<device>.{json,md,png} to --out
(quality-<device>-muon-musgd.* for the muon and musgd tasks alone).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_opt
from . import peers
from .timing import device_name

MASTERS = ("fp32", "remainder", "remainder8")
STATES = ("fp32", "bf16", "int8")
TAIL = 100  # final loss: the mean of the last TAIL steps' training losses


class BF16Model(nn.Module):
    """Params in BF16; the forward casts them to FP32 (grads flow back to the BF16 params)."""

    def w(self, name):
        return getattr(self, name).float()


class SmallCNN(BF16Model):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Parameter(torch.randn(32, 1, 3, 3) * (2 / 9) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(32))
        self.conv2 = nn.Parameter(torch.randn(64, 32, 3, 3) * (2 / 288) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(64))
        self.fc = nn.Parameter(torch.randn(10, 64 * 16) * (1 / 1024) ** 0.5)
        self.bf = nn.Parameter(torch.zeros(10))

    def forward(self, x, y):
        x = F.relu(F.conv2d(x, self.w("conv1"), self.w("b1"), padding=1))
        x = F.relu(F.conv2d(x, self.w("conv2"), self.w("b2"), stride=2, padding=1))
        return F.cross_entropy(F.linear(x.flatten(1), self.w("fc"), self.w("bf")), y)


class SmallGPT(BF16Model):
    def __init__(self, vocab, d=128, layers=2, heads=4, ctx=64):
        super().__init__()
        self.heads, self.ctx = heads, ctx
        self.wte = nn.Parameter(torch.randn(vocab, d) * 0.02)
        self.wpe = nn.Parameter(torch.randn(ctx, d) * 0.01)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = BF16Model()
            block.ln1, block.ln2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
            block.qkv = nn.Parameter(torch.randn(3 * d, d) * 0.02)
            block.proj = nn.Parameter(torch.randn(d, d) * 0.02 / (2 * layers) ** 0.5)
            block.fc1 = nn.Parameter(torch.randn(4 * d, d) * 0.02)
            block.fc2 = nn.Parameter(torch.randn(d, 4 * d) * 0.02 / (2 * layers) ** 0.5)
            self.blocks.append(block)
        self.lnf = nn.Parameter(torch.ones(d))

    def forward(self, idx, targets):
        b, t = idx.shape
        x = F.embedding(idx, self.w("wte")) + self.w("wpe")[:t]
        d = x.shape[-1]
        for blk in self.blocks:
            h = F.layer_norm(x, (d,), blk.w("ln1"))
            q, k, v = F.linear(h, blk.w("qkv")).split(d, dim=-1)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + F.linear(a, blk.w("proj"))
            h = F.layer_norm(x, (d,), blk.w("ln2"))
            x = x + F.linear(F.gelu(F.linear(h, blk.w("fc1"))), blk.w("fc2"))
        logits = F.linear(F.layer_norm(x, (d,), self.w("lnf")), self.w("wte"))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


HELD_OUT = 400


def digits_batches(steps, batch, seed):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    x, y, held_x, held_y = x[HELD_OUT:], y[HELD_OUT:], x[:HELD_OUT], y[:HELD_OUT]
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(steps * batch // len(y) + 1)])
    batches = []
    for i in range(steps):
        pick = order[i * batch:(i + 1) * batch]
        batches.append((x[pick] + 0.5 * torch.randn(len(pick), 1, 8, 8, generator=g), y[pick]))
    return batches, (held_x, held_y)


def stdlib_text(chars: int) -> str:
    text, root = [], sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text.append(f.read())
        if sum(map(len, text)) >= chars:
            break
    return "".join(text)[:chars]


def text_batches(steps, batch, ctx, seed):
    """Training windows from the first 90 % of the text; 64 held-out windows from the rest."""
    text = stdlib_text(2_000_000)
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    split = len(ids) * 9 // 10
    g = torch.Generator().manual_seed(seed)

    def windows(lo, hi, n):
        starts = torch.randint(lo, hi - ctx - 1, (n,), generator=g)
        chunk = torch.stack([ids[s:s + ctx + 1] for s in starts])
        return chunk[:, :-1], chunk[:, 1:]
    batches = [windows(0, split, batch) for _ in range(steps)]
    return len(vocab), batches, windows(split, len(ids), 64)


class SparseEmbedding(BF16Model):
    """Token embeddings and a linear head: rows of tokens not in a batch get zero grads."""

    def __init__(self, vocab=4096, d=64, classes=32):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(vocab, d) * 0.5)
        self.head = nn.Parameter(torch.randn(classes, d) * d ** -0.5)

    def forward(self, tokens, y):
        return F.cross_entropy(F.embedding(tokens, self.w("emb")) @ self.w("head").t(), y)


def token_batches(steps, batch, seed, vocab=4096, classes=32, spike_every=None):
    """Zipf(1.1) token ids, each with a fixed random label (flipped to a random one in 20 % of
    draws); with spike_every, every spike_every-th batch's loss is to be scaled 100x (its third
    element)."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    labels = torch.randint(0, classes, (vocab,), generator=g)

    def draw(n):
        tokens = torch.multinomial(weights, n, replacement=True, generator=g)
        flip = torch.rand(n, generator=g) < 0.2
        return tokens, torch.where(flip, torch.randint(0, classes, (n,), generator=g), labels[tokens])
    batches = []
    for i in range(steps):
        tokens, y = draw(batch)
        spike = 100.0 if spike_every and (i + 1) % spike_every == 0 else 1.0
        batches.append((tokens, y, spike))
    return batches, draw(2048)


TASKS = {
    "cnn": dict(rule="SGD", hyper=dict(lr=0.05, momentum=0.9, weight_decay=5e-4), title="small CNN, SGD, digits"),
    "gpt": dict(rule="AdamW", hyper=dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1),
                title="small GPT-2-style, AdamW, stdlib text"),
    "embed": dict(rule="AdamW", hyper=dict(lr=1e-2, weight_decay=0.0),
                  title="sparse embedding (Zipf tokens), AdamW"),
    "spike": dict(rule="AdamW", hyper=dict(lr=1e-2, weight_decay=0.0), clip=None,
                  title="sparse embedding, a 100x loss spike every 50 steps, no clipping, AdamW"),
    # Muon on the hidden matrices, AdamW (the gpt task's) on embeddings and norms; relative to
    # torch.optim.Muon + AdamW on an FP32 copy of the model.
    "muon": dict(rule="Muon", model="gpt", hyper=dict(lr=0.02, momentum=0.95, weight_decay=0.1),
                 others=dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1),
                 title="small GPT-2-style, Muon + AdamW, stdlib text"),
    # MuSGD on the conv weights, SGD on the rest; relative to its reference step on FP32 weights.
    "musgd": dict(rule="MuSGD", model="cnn", hyper=dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
                  title="small CNN, MuSGD, digits"),
}
MATRIX_TASKS = ("muon", "musgd")


def build(task: str, steps: int, seed: int, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    task = TASKS[task].get("model", task)
    if task == "cnn":
        batches, held_out = digits_batches(steps, 64, seed)
        model = SmallCNN()
    elif task in ("embed", "spike"):
        batches, held_out = token_batches(steps, 64, seed, spike_every=50 if task == "spike" else None)
        model = SparseEmbedding()
    else:
        vocab, batches, held_out = text_batches(steps, 16, 64, seed)
        model = SmallGPT(vocab)
    return model.to(dtype), batches, held_out


def matrix_groups(task: str, model) -> list[dict]:
    """Muon's / MuSGD's param groups: hidden matrices (a conv's weights) orthogonalized, the rest not."""
    spec = TASKS[task]
    if spec["rule"] == "Muon":
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and n not in ("wte", "wpe")]
        rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
        return [dict(params=hidden), dict(params=rest, algorithm="adamw", **spec["others"])]
    convs = [p for p in model.parameters() if p.ndim == 4]
    rest = [p for p in model.parameters() if p.ndim != 4]
    return [dict(params=convs, use_muon=True), dict(params=rest, use_muon=False)]


def torch_matrix_optimizers(task: str, groups: list[dict]) -> list:
    """The torch implementation of a matrix task: torch.optim.Muon + AdamW, or MuSGD's step
    transcribed (bench/muon.py)."""
    spec = TASKS[task]
    if spec["rule"] == "Muon":
        return [torch.optim.Muon(groups[0]["params"], **spec["hyper"]),
                torch.optim.AdamW(groups[1]["params"], **spec["others"])]
    from .muon import TranscribedMuSGD
    return [TranscribedMuSGD(groups, **spec["hyper"])]


class _Both:
    """Several optimizers stepped as one."""

    def __init__(self, opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def run(task: str, master: str | None, state: str | None, steps: int, seed: int, backend: str, peer=None) -> dict:
    """One training run; master None: torch.optim on the BF16 params, no master, or with `peer`
    (peers.Peer) another library's optimizer on them."""
    spec = TASKS[task]
    fp32_reference = task in MATRIX_TASKS and master == "torch-fp32"
    model, batches, held_out = build(task, steps, seed, torch.float32 if fp32_reference else torch.bfloat16)
    clip = spec.get("clip", 1.0)
    params = list(model.parameters())
    if task in MATRIX_TASKS:
        groups = matrix_groups(task, model)
        if master is None or fp32_reference:  # torch's, on BF16 params without masters or on an FP32 model
            opt = _Both(torch_matrix_optimizers(task, groups))
            master = None
        else:
            cls = fused_opt.FusedMixedPrecisionMuon if spec["rule"] == "Muon" else fused_opt.FusedMixedPrecisionMuSGD
            opt = cls(groups, **spec["hyper"], max_grad_norm=clip, master_weights=master, state_precision=state)
    elif peer is not None:  # torch's betas where the task names none (optimi's and HeavyBall's default beta2 is 0.99)
        opt = peer.make(params, **{**({"betas": (0.9, 0.999)} if spec["rule"] == "AdamW" else {}), **spec["hyper"]})
    elif master is None:
        opt = getattr(torch.optim, spec["rule"])(params, **spec["hyper"])
    else:
        cls = fused_opt.FusedMixedPrecisionSGD if spec["rule"] == "SGD" else fused_opt.FusedMixedPrecisionAdamW
        opt = cls(params, **spec["hyper"], max_grad_norm=clip, master_weights=master, state_precision=state,
                  backend=backend)
    losses = []
    start = time.perf_counter()
    for x, y, *spike in batches:
        loss = model(x, y)
        (loss * spike[0] if spike else loss).backward()
        if master is None and clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        held_out_loss = float(model(*held_out))
    if peer is not None:
        label, state, held = f"peer: {peer.name} {peers.version(peer.package)}", "its own", peers.held_bytes(
            params, opt.state.values())
    elif fp32_reference:
        label, state, held = "torch, FP32 weights", "fp32", peers.held_bytes(
            params, [entry for o in opt.opts for entry in o.state.values()])
    else:
        label = master or "none (torch.optim on BF16)"
        held = state_bytes(opt, params) if master else peers.held_bytes(
            params, [entry for o in getattr(opt, "opts", [opt]) for entry in o.state.values()])
    return dict(task=task, master=label, state=state or "-", losses=losses, final=sum(losses[-TAIL:]) / TAIL,
                held_out=held_out_loss, bytes_per_param=held, seconds=seconds, reference=fp32_reference)


def state_bytes(opt, params) -> float:
    """Params + optimizer state, from the storages, per param."""
    n = sum(p.numel() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v is not p:
                total += v.numel() * v.element_size()
    return total / n


def _commit() -> str:
    from .__main__ import _commit as commit
    return commit()


def report(record: dict) -> str:
    lines = [f"# Training quality of compressed masters and state ({record['device']})", "",
             f"{record['date']}, torch {record['torch']}, fused_opt {record['commit']}, {record['steps']} steps, "
             f"seed {record['seed']}. Final loss: mean training loss of the last {TAIL} steps; relative to "
             "master fp32 + state fp32 (Muon and MuSGD: to torch's implementation on an FP32 copy of the "
             "model).", ""]
    for task, spec in TASKS.items():
        rows = [r for r in record["runs"] if r["task"] == task]
        if not rows:
            continue
        ref = next((r for r in rows if r.get("reference")), None) or next(
            r for r in rows if r["master"] == "fp32" and r["state"] == "fp32")
        against = "vs torch FP32" if ref.get("reference") else "vs fp32/fp32"
        lines += [f"## {spec['title']}", "", f"| master | state | B/param (params + state) | final loss | {against} "
                  f"| held-out loss | {against} |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            rel = (r["final"] - ref["final"]) / ref["final"] * 100
            held = (r["held_out"] - ref["held_out"]) / ref["held_out"] * 100
            lines.append(f"| {r['master']} | {r['state']} | {r['bytes_per_param']:.2f} | {r['final']:.4f} | "
                         f"{rel:+.2f} % | {r['held_out']:.4f} | {held:+.2f} % |")
        lines.append("")
    return "\n".join(lines)


def plot(record: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = [t for t in TASKS if any(r["task"] == t for r in record["runs"])]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in record["runs"] if r["task"] == task):
            smooth, out = None, []
            for v in r["losses"]:
                smooth = v if smooth is None else 0.98 * smooth + 0.02 * v
                out.append(smooth)
            style = "--" if r["state"] == "int8" else (":" if r["state"] == "bf16" else "-")
            if r["state"] == "-":
                style = "-."
            if r["master"].startswith("peer:"):
                style = (0, (1, 1, 3, 1))
            ax.plot(out, linestyle=style, lw=1.2, label=f"{r['master']} / {r['state']}: {r['final']:.4f}")
        ax.set_title(TASKS[task]["title"])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (EMA 0.98)")
        ax.set_yscale("log")
        ax.legend(fontsize=7, title="master / state: final loss", title_fontsize=7)
    fig.suptitle(f"{record['device']}, torch {record['torch']}, fused_opt {record['commit']}, {record['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--masters", nargs="+", default=list(MASTERS), choices=list(MASTERS))
    ap.add_argument("--states", nargs="+", default=list(STATES), choices=list(STATES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--no-peers", dest="peers", action="store_false",
                    help="leave out the other libraries' optimizers that run here (peers.py)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = []
    for task in args.tasks:
        combos = [(m, s) for m in args.masters for s in args.states]
        if ("fp32", "fp32") not in combos:
            combos.insert(0, ("fp32", "fp32"))
        rule = TASKS[task]["rule"].lower()
        others = [p for p in peers.PEERS if args.peers and p.optimizer == rule
                  and peers.why_not(p, torch.device("cpu")) is None]
        reference = [("torch-fp32", "fp32", None)] if task in MATRIX_TASKS else []
        for master, state, peer in [*reference, *((m, s, None) for m, s in combos), (None, None, None),
                                    *((None, None, p) for p in others)]:
            r = run(task, master, state, args.steps, args.seed, args.backend, peer)
            print(f"{task:4s} master={r['master']:26s} state={r['state']:5s} final={r['final']:.4f} "
                  f"held-out={r['held_out']:.4f} "
                  f"{r['bytes_per_param']:.2f} B/param  {r['seconds']:.0f} s", flush=True)
            runs.append(r)
    record = dict(device=device_name(torch.device("cpu")), torch=torch.__version__, commit=_commit(),
                  date=time.strftime("%Y-%m-%d"), steps=args.steps, seed=args.seed, runs=runs)
    os.makedirs(args.out, exist_ok=True)
    # Muon's and MuSGD's runs alone get their own record (quality-cpu-muon-musgd.*)
    alone = set(args.tasks) <= set(MATRIX_TASKS)
    stem = os.path.join(args.out, "quality-cpu" + ("-" + "-".join(args.tasks) if alone else ""))
    with open(stem + ".json", "w") as f:
        json.dump(record, f)
    with open(stem + ".md", "w") as f:
        f.write(report(record) + "\n")
    if not plot(record, stem + ".png"):
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    print(report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
