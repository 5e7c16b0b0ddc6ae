"""Bandwidth vs params for the size sweep, one line per contender, the copy as the ceiling.
`python -m fused_opt.bench.plot bench/results/bench-cuda.json` redraws a saved record."""
from __future__ import annotations

import json
import sys


def plot(record: dict, path: str) -> bool:
    """Writes the PNG; False (and nothing written) without matplotlib or sweep rows."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in record["rows"] if r["workload"].startswith("sweep")]
    if not rows:
        return False
    # One colour per contender across every panel (a panel may lack some contenders), and
    # one legend for the figure that names exactly the lines drawn.
    names = list(dict.fromkeys(r["contender"] for r in rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len({r["dtype"] for r in rows}), figsize=(13, 5), squeeze=False)
    drawn = {}
    for ax, dtype in zip(axes[0], sorted({r["dtype"] for r in rows})):
        for name in names:
            points = sorted((r["params"], r["gb_s"]) for r in rows if r["contender"] == name and r["dtype"] == dtype)
            if points:
                drawn[name], = ax.plot(*zip(*points), marker="o", color=colours[name], label=name)
        drawn["device copy (read+write)"] = ax.axhline(record["copy_gb_s"], color="black", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("effective GB/s at 22 B/param")
        ax.set_title(f"{dtype} params")
        ax.grid(alpha=0.3)
    fig.suptitle(f"One optimizer step, {record['device']} ({record['date'][:10]})")
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.legend(list(drawn.values()), list(drawn.keys()), loc="center right", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    source = sys.argv[1]
    with open(source) as f:
        print("wrote" if plot(json.load(f), source.replace(".json", ".png")) else "nothing to plot", source.replace(".json", ".png"))
