"""Evaluating a trained checkpoint: IoU / Dice per pruning level, inference time, overlays; predicting masks.

    report = evaluate("runs/unetpp/best.pth", out_dir="runs/unetpp/eval")
    # report["modes"]: one entry per UNet++ level L1..Ldepth (fast mode, the pruned sub-network)
    # and the accurate mode (mean of the heads); metrics.json and overlays.png in out_dir

The validation split is rebuilt from the settings stored in the checkpoint (data folder, size,
limit, seed, fraction), so it is the split the model was selected on. Inference time is measured
with `unetpp_fast.bench.time_callable` on one batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from unetpp_fast.bench.timing import time_callable
from unetpp_fast.ops.backends import resolve_name, use_backend
from unetpp_fast.train import data as data_module
from unetpp_fast.train.training import count_parameters, load_trained, predict_logits, resolve_device, score

METRICS_NAME = "metrics.json"
OVERLAY_NAME = "overlays.png"


def evaluation_modes(model: nn.Module) -> list[tuple[str, int | None, nn.Module]]:
    """(name, level, module) to score: UNet++ with deep supervision gives L1..Ldepth and 'accurate'."""
    if getattr(model, "deep_supervision", False) and hasattr(model, "pruned"):
        modes: list[tuple[str, int | None, nn.Module]] = [
            (f"L{level}", level, model.pruned(level).eval()) for level in range(1, model.depth + 1)
        ]
        model.mode, model.prune = "accurate", None
        modes.append(("accurate", None, model.eval()))
        return modes
    return [("full", None, model.eval())]


def _time_per_image(
    module: nn.Module, images: torch.Tensor, device: torch.device, rounds: int
) -> tuple[float, int]:
    x = data_module.normalize(images.to(device))

    def forward() -> Any:
        with torch.no_grad():
            return module(x)

    stats = time_callable(forward, device, warmup=1, rounds=rounds)
    return stats.median_s / x.shape[0] * 1e3, x.shape[0]


def evaluate(
    checkpoint: str,
    data: str | None = None,
    out_dir: str | None = None,
    device: str = "auto",
    backend: str = "auto",
    batch_size: int = 16,
    samples: int = 4,
    timing_rounds: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score every mode of the checkpoint's model on its validation split; write metrics JSON and overlays."""
    dev = resolve_device(device)
    model, payload = load_trained(checkpoint, dev)
    info = payload["data"]
    root = data if data else info["root"]
    dataset = data_module.load_dataset(root, info["size"], info["limit"], info["seed"])
    _, val = data_module.split_dataset(dataset, info["val_fraction"], info["seed"])
    if list(val.ids) != list(info.get("val_ids", val.ids)):
        log("warning: this validation split differs from the one the model was trained on")
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(payload["path"])), "eval")
    os.makedirs(out_dir, exist_ok=True)

    results = []
    accurate_logits = None
    with use_backend(backend):
        backend_name = resolve_name(dev)
        for name, level, module in evaluation_modes(model):
            logits = predict_logits(module, val.images, dev, batch_size)
            # A CPU times a small batch: the full network at batch 16 takes seconds per call there.
            timing_images = val.images[: batch_size if dev.type == "cuda" else min(batch_size, 4)]
            ms, timed_batch = _time_per_image(module, timing_images, dev, timing_rounds)
            entry = {
                "mode": name,
                "level": level,
                "params": count_parameters(module),
                **score(logits, val.masks),
            }
            entry.update(ms_per_image=ms, timed_batch=timed_batch)
            results.append(entry)
            if name in ("accurate", "full"):
                accurate_logits = logits
            log(
                f"{name:>9}  IoU {entry['iou']:.4f}  Dice {entry['dice']:.4f}  "
                f"{ms:.2f} ms/image  {entry['params'] / 1e6:.3f}M params"
            )

    report = {
        "checkpoint": os.path.abspath(payload["path"]),
        "epoch": payload["epoch"],
        "model": payload["model"],
        "data": os.path.abspath(root),
        "n_val": len(val),
        "size": info["size"],
        "device": str(dev),
        "backend": backend_name,
        "threshold": 0.5,
        "modes": results,
    }
    metrics_path = os.path.join(out_dir, METRICS_NAME)
    with open(metrics_path, "w") as fh:
        json.dump(report, fh, indent=1)
    report["metrics_path"] = metrics_path
    if samples > 0 and accurate_logits is not None:
        from unetpp_fast.bench.plots import plot_overlays

        pick = _overlay_indices(len(val), samples)
        images = val.images[pick].permute(0, 2, 3, 1).numpy()
        truths = val.masks[pick, 0].numpy()
        preds = (accurate_logits[pick, 0] > 0).numpy()  # logit > 0  <=>  probability > 0.5
        label = "prediction (accurate)" if results[-1]["mode"] == "accurate" else "prediction"
        report["overlay_path"] = plot_overlays(
            images, truths, preds, os.path.join(out_dir, OVERLAY_NAME), [val.ids[i][:12] for i in pick], label
        )
    return report


def _overlay_indices(n: int, samples: int) -> list[int]:
    """Evenly spread validation samples (deterministic)."""
    count = min(samples, n)
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, count)})


def predict_folder(
    checkpoint: str,
    inputs: str,
    out_dir: str,
    device: str = "auto",
    backend: str = "auto",
    level: int | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Segment every image found under `inputs`; write <out_dir>/<name>.png masks (0/255) at the input size.

    level: run the UNet++ pruned to head L (fast mode) instead of the accurate mode.
    """
    from skimage import io
    from skimage.transform import resize

    dev = resolve_device(device)
    model, payload = load_trained(checkpoint, dev)
    if level is not None:
        if not getattr(model, "deep_supervision", False):
            raise ValueError("--level needs a UNet++ trained with deep supervision")
        model = model.pruned(level).eval()
    size = payload["data"]["size"]
    paths = data_module.find_images(inputs)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with use_backend(backend):
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            originals = [data_module.read_image(p) for p in chunk]
            batch = np.stack([data_module.resize_image(im, size) for im in originals])
            logits = predict_logits(model, torch.from_numpy(batch).permute(0, 3, 1, 2), dev, batch_size)
            for path, image, logit in zip(chunk, originals, logits[:, 0].numpy()):
                prob = 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))
                if prob.shape != image.shape[:2]:
                    prob = resize(prob, image.shape[:2], order=1)
                mask = (prob > 0.5).astype(np.uint8) * 255
                name = os.path.splitext(os.path.basename(path))[0] + ".png"
                target = os.path.join(out_dir, name)
                io.imsave(target, mask, check_contrast=False)
                written.append(target)
    log(f"wrote {len(written)} masks to {out_dir}")
    return written
