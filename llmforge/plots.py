"""`llmforge plot RUN_DIR`: PNG charts of a run's metrics.jsonl (loss and val loss, lr, grad norm, tokens/s; for a
mixture of experts, the router losses and each block's expert load)."""

from __future__ import annotations

import os

from llmforge.train.metrics import read_metrics

CHARTS = (
    ("loss", "loss", [("loss", "train loss"), ("val_loss", "val loss")]),
    ("lr", "learning rate", [("lr", "lr")]),
    ("grad_norm", "gradient norm", [("grad_norm", "grad norm")]),
    ("tokens_per_s", "tokens/s", [("tokens_per_s", "tokens/s")]),
    # mixture of experts (rows of dense runs have none of these keys, so no chart is drawn)
    ("router", "router losses", [("balance_loss", "load balancing"), ("router_z_loss", "router z-loss")]),
)


def expert_load_chart(rows: list[dict]) -> tuple[str, str, list[tuple[str, str]]]:
    """Per MoE block, its busiest and idlest expert's assignments over the mean (1 = balanced)."""
    keys = sorted({k for r in rows for k in r if k.startswith("expert_load_")}, key=lambda k: (int(k.split(".")[1]), k))
    labels = [(k, f"block {k.split('.')[1]} {'max' if 'max' in k else 'min'}") for k in keys]
    return ("expert_load", "expert load / mean", labels)


def plot_run(run_dir: str) -> list[str]:
    """Write <run_dir>/plots/<name>.png for each chart with data; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, title, series in (*CHARTS, expert_load_chart(rows)):
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        drawn = False
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if "event" not in r and r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label, marker="o" if key == "val_loss" else None, markersize=3)
                drawn = True
        skipped = [r["step"] for r in rows if r.get("event") == "skipped_step"]
        if name == "loss" and skipped:
            for step in skipped:
                ax.axvline(step, color="red", alpha=0.3, linewidth=0.8)
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(f"{os.path.basename(os.path.normpath(run_dir))}: {title}")
            ax.grid(alpha=0.3)
            ax.legend()
            path = os.path.join(out_dir, f"{name}.png")
            fig.tight_layout()
            fig.savefig(path + ".tmp.png")
            os.replace(path + ".tmp.png", path)
            written.append(path)
        plt.close(fig)
    return written
