"""PNG figures of the command-line jobs: pruning speed, segmentation overlays, training curves.

matplotlib is imported lazily with the non-interactive Agg backend, so these work on headless machines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def plot_pruning_speed(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
    """Milliseconds per batch vs pruning level (UNet++ L1..L4), one line per backend; U-Net dashed.

    `rows` are those of `unetpp_fast.bench.pruning_throughput`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, backend in enumerate(backends):
        color = colors[i % len(colors)]
        points = sorted(
            (r["prune"], r["ms_per_batch"])
            for r in rows
            if r["backend"] == backend and r["prune"] is not None and r["ms_per_batch"] is not None
        )
        if points:
            levels, ms = zip(*points)
            ax.plot(levels, ms, marker="o", color=color, label=f"UNet++ {backend}")
        for r in rows:
            if r["backend"] == backend and r["prune"] is None and r["ms_per_batch"] is not None:
                style = "--" if r["model"] == "U-Net" else ":"
                ax.axhline(
                    r["ms_per_batch"],
                    color=color,
                    linestyle=style,
                    linewidth=1,
                    label=f"{r['model']} {backend}",
                )
    ax.set_xlabel("pruning level (UNet++ L1..L4, fast mode)")
    ax.set_ylabel("milliseconds per batch (median)")
    ax.set_xticks(sorted({r["prune"] for r in rows if r["prune"] is not None}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _ensure_parent(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _error_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The image darkened, with true positives yellow, false positives red, false negatives cyan."""
    out = image.astype(np.float32) / 255.0 * 0.5
    colors = {
        "tp": (truth & pred, (1.0, 0.9, 0.1)),
        "fp": (~truth & pred, (1.0, 0.1, 0.1)),
        "fn": (truth & ~pred, (0.1, 0.9, 1.0)),
    }
    for mask, color in colors.values():
        out[mask] = 0.35 * out[mask] + 0.65 * np.asarray(color, dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def plot_overlays(
    images: np.ndarray,
    truths: np.ndarray,
    predictions: np.ndarray,
    path: str,
    titles: Sequence[str] | None = None,
    prediction_label: str = "prediction",
) -> str:
    """One row per sample: image, ground truth, prediction, errors (TP yellow, FP red, FN cyan).

    images uint8 [N, H, W, 3]; truths and predictions bool [N, H, W].
    """
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8.0, 2.1 * n), dpi=110, squeeze=False)
    headers = ("image", "ground truth", prediction_label, "TP yellow / FP red / FN cyan")
    for row in range(n):
        panels = (
            images[row],
            truths[row],
            predictions[row],
            _error_overlay(images[row], truths[row], predictions[row]),
        )
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(headers[col], fontsize=8)
        if titles is not None:
            axes[row][0].set_ylabel(titles[row], fontsize=7)
    fig.tight_layout()
    _ensure_parent(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_history(history: Sequence[dict[str, float]], path: str) -> str:
    """Training and validation loss, and validation IoU, per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2), dpi=110)
    left.plot(epochs, [h["train_loss"] for h in history], marker=".", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker=".", label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("BCE + Dice loss")
    left.legend(fontsize=8)
    right.plot(epochs, [h["val_iou"] for h in history], marker=".", color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("validation IoU")
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    _ensure_parent(path)
    fig.savefig(path)
    plt.close(fig)
    return path
