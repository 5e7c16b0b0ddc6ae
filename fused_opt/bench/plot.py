"""The speedup of each of our contenders over the fastest torch pipeline, per workload (every
workload, the many-tensor ones included), one panel per dtype, on a log scale.
`python -m fused_opt.bench.plot bench-out/bench-cpu.json` redraws a saved record."""
from __future__ import annotations

import json
import sys


def plot(record: dict, path: str) -> str | None:
    """Writes the PNG and returns None, or returns why it wrote none."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in record["rows"] if r["contender"].startswith("fused_opt") and r["speedup_vs_best_torch_paired"]]
    if not rows:
        return "no row of ours has a paired ratio to draw"
    dtypes = sorted({r["dtype"] for r in rows})
    names = list(dict.fromkeys(r["contender"] for r in rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    label = _label_of(rows)
    workloads = list(dict.fromkeys(map(label, rows)))
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(8, 1.6 * len(workloads)), 4 * len(dtypes)), squeeze=False)
    width = 0.8 / len(names)
    drawn = {}
    for ax, dtype in zip(axes[:, 0], dtypes):
        # each panel its own workloads (FP32 params have a plan of their own)
        panel = [w for w in workloads if any(label(r) == w and r["dtype"] == dtype for r in rows)]
        for k, name in enumerate(names):
            points = [(i, r["speedup_vs_best_torch_paired"]) for i, w in enumerate(panel) for r in rows
                      if label(r) == w and r["dtype"] == dtype and r["contender"] == name]
            if points:
                xs, ys = zip(*points)
                drawn[name] = ax.bar([x + (k - len(names) / 2 + 0.5) * width for x in xs], ys, width,
                                     color=colours[name], label=name)
        drawn["torch (1x)"] = ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(panel)), panel, fontsize=8)
        ax.set_ylabel("speedup vs best torch (paired)")
        ax.set_title(f"{dtype} params")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"One optimizer step, {record['device']} ({record['date'][:10]}, torch {record['torch']})")
    fig.tight_layout(rect=(0, 0, 0.75, 1))
    fig.legend(list(drawn.values()), list(drawn.keys()), loc="center right", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _label_of(rows):
    """A workload's tick label: with both optimizers in the record, which one ("SGD"/"AdamW")."""
    both = len({r.get("optimizer", "sgd") for r in rows}) > 1
    names = {"sgd": "SGD", "adamw": "AdamW"}
    return lambda r: f"{r['workload']}\n{names[r.get('optimizer', 'sgd')]}" if both else r["workload"]


if __name__ == "__main__":
    source = sys.argv[1]
    with open(source) as f:
        why_not = plot(json.load(f), source.replace(".json", ".png"))
        print(f"no plot: {why_not}" if why_not else f"wrote {source.replace('.json', '.png')}")
