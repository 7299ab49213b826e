"""PNG figures of the command-line jobs: pruning speed, segmentation overlays, training curves.

matplotlib is imported lazily with the non-interactive Agg backend, so these work on headless machines.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    """PNG through a temporary file and a rename: a reader (or a kill) never sees half a figure."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    _save(fig, path)
    plt.close(fig)
    return path


def stretch_contrast(image: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """uint8 image with its `low`..`high` percentiles stretched to 0..255.

    Fluorescence microscopy images are mostly near-black; stretched, the nuclei are visible.
    """
    lo, hi = np.percentile(image, (low, high))
    if hi <= lo:
        return image.astype(np.uint8)
    out = (image.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def mask_overlay(
    image: np.ndarray, mask: np.ndarray, color: Sequence[float] = (1.0, 0.85, 0.0)
) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the contrast-stretched image, the mask tinted and its outline drawn."""
    base = stretch_contrast(image).astype(np.float32) / 255.0
    if base.ndim == 2:
        base = np.repeat(base[:, :, None], 3, axis=2)
    tint = np.asarray(color, dtype=np.float32)
    out = base.copy()
    out[mask] = 0.6 * base[mask] + 0.4 * tint
    edge = mask & ~_eroded(mask)
    out[edge] = tint
    return np.round(out * 255).astype(np.uint8)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """A pixel stays when its 4 neighbours are in the mask too (the border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    return padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _error_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The image darkened, with true positives yellow, false positives red, false negatives cyan."""
    out = stretch_contrast(image).astype(np.float32) / 255.0 * 0.5
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

    images uint8 [N, H, W, 3] (or a list of [H, W, 3] of any sizes), shown contrast-stretched;
    truths and predictions bool [N, H, W] (or lists).
    """
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8.0, 2.1 * n), dpi=110, squeeze=False)
    headers = ("image", "ground truth", prediction_label, "TP yellow / FP red / FN cyan")
    for row in range(n):
        panels = (
            stretch_contrast(images[row]),
            truths[row],
            predictions[row],
            _error_overlay(images[row], truths[row], predictions[row]),
        )
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            # Masks on a fixed 0..1 scale: imshow would stretch an all-foreground mask to black.
            scale = {"cmap": "gray", "vmin": 0, "vmax": 1} if panel.ndim == 2 else {}
            ax.imshow(panel, interpolation="nearest", **scale)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(headers[col], fontsize=8)
        if titles is not None:
            axes[row][0].set_ylabel(titles[row], fontsize=7)
    fig.tight_layout()
    _save(fig, path)
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
    _save(fig, path)
    plt.close(fig)
    return path
