"""Charts of a training run's `metrics.jsonl` as PNG files (matplotlib, headless).

losses.png        train loss, validation loss and bits-per-byte, learning rate
expert_load.png   per layer: share of tokens per expert over training (heatmap)
routing.png       load imbalance (max/mean), router entropy, dead experts per layer
audit.png         routing stability between audits, activation RMS of audited layers
"""

from __future__ import annotations

import json
import os

import numpy as np


def read_metrics(path: str) -> dict[str, list[dict]]:
    """metrics.jsonl -> records grouped by kind (train, eval, audit, summary)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    by_kind: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            by_kind.setdefault(rec.get("kind", "train"), []).append(rec)
    if not by_kind.get("train"):
        raise ValueError(f"{path}: no training records")
    return by_kind


def plot_run(metrics_path: str, out_dir: str) -> list[str]:
    """Write the charts; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_metrics(metrics_path)
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    train, evals = m["train"], m.get("eval", [])
    steps = [r["step"] for r in train]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.plot(steps, [r["loss"] for r in train], label="train loss (nats/token)")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                 label="val loss (nats/token)")  # fmt: skip
        bpb = ax1.twinx()
        bpb.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "s--",
                 color="tab:green", label="val bits/byte")  # fmt: skip
        bpb.set_ylabel("val bits per byte", color="tab:green")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss")
    ax1.legend(loc="upper right")
    ax1.set_title("Loss")
    ax2.plot(steps, [r["lr"] for r in train])
    ax2.set_xlabel("optimizer step")
    ax2.set_title("Learning rate")
    save(fig, "losses.png")

    loads = [
        np.asarray(r["expert_tokens"], float) for r in train if "expert_tokens" in r
    ]
    if loads:
        load_SLE = np.stack(loads)
        share_SLE = load_SLE / load_SLE.sum(-1, keepdims=True).clip(min=1)
        n_layers, n_experts = share_SLE.shape[1:]
        fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers + 1.5, 3.8),
                                 squeeze=False, layout="constrained")  # fmt: skip
        vmax = max(2.0 / n_experts, share_SLE.max())
        extent = (steps[0], steps[-1], n_experts - 0.5, -0.5)
        for i, ax in enumerate(axes[0]):
            im = ax.imshow(share_SLE[:, i].T, aspect="auto", cmap="viridis", vmin=0,
                           vmax=vmax, extent=extent)  # fmt: skip
            ax.set_title(f"layer {i}")
            ax.set_xlabel("step")
            ax.set_yticks(range(n_experts))
            ax.set_ylabel("expert")
        fig.colorbar(im, ax=axes[0].tolist(), label="share of token assignments")
        fig.suptitle(f"Expert load (balanced = {1 / n_experts:.3f})")
        path = os.path.join(out_dir, "expert_load.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        ratio = [r["expert_load_max_over_mean_per_layer"] for r in train]
        ent = [r["router_entropy"] for r in train]
        dead = [r["dead_experts"] for r in train]
        for i in range(n_layers):
            axes[0].plot(steps, [x[i] for x in ratio], label=f"layer {i}")
            axes[1].plot(steps, [x[i] for x in ent], label=f"layer {i}")
            axes[2].plot(steps, [x[i] for x in dead], label=f"layer {i}")
        axes[0].axhline(1.0, color="gray", ls=":")
        axes[1].axhline(np.log(n_experts), color="gray", ls=":", label="uniform")
        titles = ("Load max/mean (1 = balanced)", "Router entropy (nats)",
                  "Dead experts in window")  # fmt: skip
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        save(fig, "routing.png")

    audits = m.get("audit", [])
    if audits:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        stab = [r for r in audits if "routing_top1_agreement" in r]
        if stab:
            for i in range(len(stab[0]["routing_top1_agreement"])):
                ax1.plot([r["step"] for r in stab],
                         [r["routing_top1_agreement"][i] for r in stab], "o-",
                         label=f"layer {i}")  # fmt: skip
            ax1.legend(fontsize=7)
        ax1.set_ylim(0, 1.05)
        ax1.set_title("Routing stability: top-1 expert unchanged since last audit")
        ax1.set_xlabel("step")
        for path in audits[0]["activations"]:
            ax2.plot([r["step"] for r in audits],
                     [r["activations"][path]["rms"] for r in audits], "o-",
                     label=path)  # fmt: skip
        ax2.set_title("Activation RMS on the probe set")
        ax2.set_xlabel("step")
        ax2.legend(fontsize=7)
        save(fig, "audit.png")
    return written
