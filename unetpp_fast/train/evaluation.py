"""Evaluating a trained checkpoint: IoU / Dice per pruning level, inference time, overlays; predicting masks.

    report = evaluate("runs/unetpp/best.pth", out_dir="runs/unetpp/eval")
    # report["modes"]: one entry per UNet++ level L1..Ldepth (fast mode, the pruned sub-network)
    # and the accurate mode (mean of the heads); metrics.json and overlays.png in out_dir
    result = predict_folder("runs/unetpp/best.pth", "my_images/", "masks/", resolution="native")

The validation split is rebuilt from the settings stored in the checkpoint (data folder, size or
crop, limit, seed, fraction), so it is the split the model was selected on; a model trained on
crops is scored on whole images at native resolution. Inference time: every mode is timed in turn,
round after round (so a change in the machine's load hits all modes alike), with the median and
the interquartile spread reported.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from unetpp_fast.bench.timing import time_callable
from unetpp_fast.ops import backend_choice
from unetpp_fast.ops.backends import use_backend
from unetpp_fast.train import data as data_module
from unetpp_fast.train import inference, volume_data
from unetpp_fast.train.text import plural
from unetpp_fast.train.training import (
    count_parameters,
    dataset_logits,
    load_trained,
    resolve_device,
    score_dataset,
    score_images,
)

METRICS_NAME = "metrics.json"
OVERLAY_NAME = "overlays.png"
NOISY_SPREAD = 0.25  # interquartile range / median above which a timing is called noisy
PROBABILITY_FORMATS = ("npy", "tiff", "png")


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


def time_modes(
    modules: Sequence[nn.Module], x: torch.Tensor, device: torch.device, rounds: int, progress: bool = False
) -> list[dict[str, float]]:
    """Milliseconds per image of each module on `x`: median, quartiles, spread = IQR / median.

    Interleaved: round r times every module once, so load changes during the measurement are shared.
    """
    samples: list[list[float]] = [[] for _ in modules]
    for module in modules:  # warm-up: first calls allocate and pick backends
        with torch.no_grad():
            module(x)
    from tqdm import tqdm

    for _ in tqdm(range(rounds), desc="timing", unit="round", disable=not progress, leave=False):
        for i, module in enumerate(modules):

            def forward(module: nn.Module = module) -> Any:
                with torch.no_grad():
                    return module(x)

            samples[i].append(time_callable(forward, device, warmup=0, rounds=1).median_s)
    out = []
    for values in samples:
        per_image = sorted(v / x.shape[0] * 1e3 for v in values)
        q1, _, q3 = (
            statistics.quantiles(per_image, n=4, method="inclusive")
            if len(per_image) > 1
            else (per_image[0],) * 3
        )
        median = statistics.median(per_image)
        out.append({"ms_per_image": median, "ms_q1": q1, "ms_q3": q3, "spread": (q3 - q1) / median})
    return out


def timing_note(entries: Sequence[dict[str, Any]]) -> str | None:
    """A warning when timings cannot be trusted: a wide spread, or a pruned level slower than a larger one."""
    levels = [e for e in entries if e.get("level") is not None]
    inverted = [
        f"L{a['level']} {a['ms_per_image']:.2f} ms > L{b['level']} {b['ms_per_image']:.2f} ms"
        for a, b in zip(levels, levels[1:])
        if a["ms_per_image"] > b["ms_per_image"]
    ]
    noisy = [e["mode"] for e in entries if e["spread"] > NOISY_SPREAD]
    if not inverted and not noisy:
        return None
    reasons = inverted + (
        [f"quartiles over {NOISY_SPREAD:.0%} of the median apart: {', '.join(noisy)}"] if noisy else []
    )
    why = "; ".join(reasons)
    return f"note: the timings are noisy ({why}); use more --rounds or an idle machine"


def _timing_input(
    val: data_module.NucleiDataset, dev: torch.device, batch_size: int, multiple: int
) -> torch.Tensor:
    if isinstance(val, volume_data.VolumeDataset):  # one whole volume, padded as prediction pads it
        from unetpp_fast.train.volume_inference import pad_far_end

        sizes = [-(-s // multiple) * multiple for s in val.images[0].shape[1:]]
        return pad_far_end(val.images[0][None].to(dev), sizes)
    if val.native:  # one whole image at its own size, padded as prediction pads it
        return inference.pad_to_multiple(data_module.normalize(val.images[0][None].to(dev)), multiple)[0]
    # A CPU times a small batch: the full network at batch 16 takes seconds per call there.
    count = batch_size if dev.type == "cuda" else min(batch_size, 4)
    return data_module.normalize(val.images[:count].to(dev))


def _foreground_iou(logits: Any, val: Any) -> dict[str, float]:
    """{'iou_foreground': mean IoU of the volumes that hold foreground} for volumes (an empty volume
    predicted empty scores 1 in the plain mean); {} for images."""
    if not isinstance(val, volume_data.VolumeDataset):
        return {}
    found = [(lg, m) for lg, m in zip(logits, val.masks) if m.any()]
    if not found:
        return {}
    return {"iou_foreground": score_images([f[0] for f in found], [f[1] for f in found])["iou"]}


def evaluate(
    checkpoint: str,
    data: str | None = None,
    out_dir: str | None = None,
    device: str = "auto",
    backend: str = "auto",
    batch_size: int = 16,
    samples: int = 4,
    timing_rounds: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Score every mode of the checkpoint's model on its validation split; write metrics JSON and overlays.

    timing_rounds: timed forward passes per mode (default: 10 on a CPU, 30 on a GPU).
    """
    from tqdm import tqdm

    dev = resolve_device(device)
    model, payload = load_trained(checkpoint, dev)
    info = payload["data"]
    root = data if data else info["root"]
    native = info.get("crop") is not None
    if info.get("dims") == 3:  # volumes: scored whole (sliding windows when large), as in training
        dataset: Any = volume_data.load_volumes(
            root, info.get("hu_window"), info["limit"], info["seed"], progress=progress
        )
        samples = 0  # overlays are drawn for images
    else:
        dataset = data_module.load_dataset(
            root, info["size"], info["limit"], info["seed"], progress=progress, native=native
        )
    _, val = data_module.split_dataset(dataset, info["val_fraction"], info["seed"])
    if list(val.ids) != list(info.get("val_ids", val.ids)):
        log("warning: this validation split differs from the one the model was trained on")
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(payload["path"])), "eval")
    os.makedirs(out_dir, exist_ok=True)
    rounds = timing_rounds or (30 if dev.type == "cuda" else 10)
    modes = evaluation_modes(model)
    with use_backend(backend):
        backend_name = backend_choice.describe(dev, training=False)
    if on_start is not None:
        on_start(
            {
                "checkpoint": payload["path"],
                "epoch": payload["epoch"],
                "model": payload["model"],
                "params": count_parameters(model),
                "device": dev,
                "backend": backend_name,
                "data": root,
                "n_val": len(val),
                "native": native,
                "dims": info.get("dims", 2),
                "size": info["size"],
                "rounds": rounds,
                "out_dir": out_dir,
                "unmatched_masks": data_module.unmatched_masks(root),
            }
        )
    results, logits_of = [], {}
    bar = tqdm(total=len(modes) * len(val), desc="scoring", unit="image", disable=not progress, leave=False)
    with use_backend(backend):
        for name, level, module in modes:
            bar.set_postfix_str(name)
            logits_of[name] = dataset_logits(module, val, dev, batch_size, bar.update)
            entry = {"mode": name, "level": level, "params": count_parameters(module)}
            results.append(
                {**entry, **score_dataset(logits_of[name], val), **_foreground_iou(logits_of[name], val)}
            )
        bar.close()
        x = _timing_input(val, dev, batch_size, inference.size_multiple(model))
        for entry, timing in zip(results, time_modes([m for _, _, m in modes], x, dev, rounds, progress)):
            entry.update(timing, timed_batch=x.shape[0], timed_size=list(x.shape[2:]))
            foreground = (
                f" (with foreground {entry['iou_foreground']:.4f})" if "iou_foreground" in entry else ""
            )
            log(
                f"{entry['mode']:>9}  IoU {entry['iou']:.4f}{foreground}  Dice {entry['dice']:.4f}  "
                f"{entry['ms_per_image']:.2f} ms/image "
                f"(quartiles {entry['ms_q1']:.2f}-{entry['ms_q3']:.2f})  "
                f"{plural(entry['params'], 'parameter')}"
            )
    note = timing_note(results)
    if note:
        log(note)
    report = {
        "checkpoint": os.path.abspath(payload["path"]),
        "epoch": payload["epoch"],
        "model": payload["model"],
        "data": os.path.abspath(root),
        "n_val": len(val),
        "size": info["size"],
        "native": native,
        "device": str(dev),
        "backend": backend_name,
        "threshold": 0.5,
        "timing_rounds": rounds,
        "timing_note": note,
        "modes": results,
    }
    metrics_path = os.path.join(out_dir, METRICS_NAME)
    with open(metrics_path, "w") as fh:
        json.dump(report, fh, indent=1)
    report["metrics_path"] = metrics_path
    final = results[-1]["mode"]
    if samples > 0:
        report["overlay_path"] = _draw_overlays(val, logits_of[final], samples, out_dir, final)
    return report


def _draw_overlays(val: data_module.NucleiDataset, logits: Any, samples: int, out_dir: str, mode: str) -> str:
    from unetpp_fast.bench.plots import plot_overlays

    pick = _overlay_indices(len(val), samples)
    images = [val.images[i].permute(1, 2, 0).numpy() for i in pick]
    truths = [val.masks[i][0].numpy() for i in pick]
    preds = [(logits[i][0] > 0).numpy() for i in pick]  # logit > 0  <=>  probability > 0.5
    label = "prediction (accurate)" if mode == "accurate" else "prediction"
    return plot_overlays(
        images, truths, preds, os.path.join(out_dir, OVERLAY_NAME), [val.ids[i][:12] for i in pick], label
    )


def _overlay_indices(n: int, samples: int) -> list[int]:
    """Evenly spread validation samples (deterministic)."""
    count = min(samples, n)
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, count)})


# ----------------------------------------------------------------------------------------------
# prediction


@dataclass
class PredictResult:
    written: list[str] = field(default_factory=list)  # mask files
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, why) of unreadable images
    resolution: str = "native"


def default_resolution(payload: dict[str, Any]) -> str:
    """How a checkpoint predicts by default: at the pixel scale it was trained at.

    A model trained on native-resolution crops runs on whole images as they are; a model trained on
    images squeezed to size x size sees each image squeezed the same way.
    """
    return "native" if payload.get("data", {}).get("crop") is not None else "resized"


def _outputs(path: str, out_dir: str) -> dict[str, str]:
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
    return {
        "mask": stem + ".png",
        "npy": stem + "_prob.npy",
        "tiff": stem + "_prob.tif",
        "png": stem + "_prob.png",
        "overlay": stem + "_overlay.png",
    }


def _refuse_overwriting_inputs(paths: Sequence[str], out_dir: str) -> None:
    """A mask written over its own image would destroy the input (e.g. --out pointing at the images)."""
    inputs = {os.path.realpath(p) for p in paths}
    for path in paths:
        clash = [t for t in _outputs(path, out_dir).values() if os.path.realpath(t) in inputs]
        if clash:
            raise data_module.DatasetError(
                f"predicting into {out_dir!r} would overwrite the input image {clash[0]!r}: "
                "choose another --out"
            )


def _write_outputs(
    path: str,
    image: np.ndarray,
    prob: np.ndarray,
    out_dir: str,
    threshold: float,
    save_probabilities: str | None,
    overlay: bool,
) -> str:
    from skimage import io

    targets = _outputs(path, out_dir)
    mask = prob > threshold
    io.imsave(targets["mask"], mask.astype(np.uint8) * 255, check_contrast=False)
    if save_probabilities == "npy":
        np.save(targets["npy"], prob.astype(np.float32))
    elif save_probabilities == "tiff":
        import tifffile

        tifffile.imwrite(targets["tiff"], prob.astype(np.float32))
    elif save_probabilities == "png":  # 16-bit: probability x 65535
        io.imsave(targets["png"], np.round(prob * 65535).astype(np.uint16), check_contrast=False)
    if overlay:
        from unetpp_fast.bench.plots import mask_overlay

        io.imsave(targets["overlay"], mask_overlay(image, mask), check_contrast=False)
    return targets["mask"]


def predict_folder(
    checkpoint: str,
    inputs: str,
    out_dir: str,
    device: str = "auto",
    backend: str = "auto",
    level: int | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
    resolution: str = "auto",
    tile: int = inference.DEFAULT_TILE,
    overlap: float = inference.DEFAULT_OVERLAP,
    threshold: float = 0.5,
    save_probabilities: str | None = None,
    overlay: bool = False,
    skip_unreadable: bool = False,
    progress: bool = False,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> PredictResult:
    """Segment every image found under `inputs`; write <out_dir>/<name>.png masks (0/255) at the input size.

    level: run the UNet++ pruned to head L (fast mode) instead of the accurate mode.
    batch_size: tiles per forward pass when an image runs as tiles.
    resolution: 'native' (the image as it is, padded; tiled above `tile` pixels), 'resized' (squeezed
    to the training size and interpolated back), or 'auto' (how the checkpoint was trained).
    save_probabilities: also write the foreground probability as 'npy', 'tiff' (float32) or 'png' (16-bit).
    overlay: also write <name>_overlay.png, the contrast-stretched image with the mask drawn on it.
    skip_unreadable: report an image that cannot be read and go on, instead of stopping.
    """
    from tqdm import tqdm

    if save_probabilities not in (None, *PROBABILITY_FORMATS):
        raise ValueError(
            f"save_probabilities must be one of {PROBABILITY_FORMATS}, got {save_probabilities!r}"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    dev = resolve_device(device)
    model, payload = load_trained(checkpoint, dev)
    if level is not None:
        if not getattr(model, "deep_supervision", False):
            raise ValueError("--level needs a UNet++ trained with deep supervision")
        if not 1 <= level <= model.depth:
            raise ValueError(f"--level must be between 1 and {model.depth} for this network, got {level}")
        model = model.pruned(level).eval()
    resolution = default_resolution(payload) if resolution == "auto" else resolution
    paths = data_module.find_images(inputs)
    _refuse_overwriting_inputs(paths, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with use_backend(backend):
        backend_name = backend_choice.describe(dev, training=False)
    if on_start is not None:
        on_start(
            {
                "checkpoint": payload["path"],
                "model": payload["model"],
                "params": count_parameters(model),
                "device": dev,
                "backend": backend_name,
                "n_images": len(paths),
                "resolution": resolution,
                "size": payload["data"]["size"],
                "tiled": resolution == "native" and bool(tile) and inference.monai_available(),
                "out_dir": out_dir,
            }
        )
    result = PredictResult(resolution=resolution)
    with use_backend(backend):
        for path in tqdm(paths, desc="predicting", unit="image", disable=not progress):
            try:
                image = data_module.read_image(path)
            except data_module.DatasetError as exc:
                if not skip_unreadable:
                    raise data_module.DatasetError(
                        f"{exc} (--skip-unreadable goes on past such files)"
                    ) from None
                result.skipped.append((path, str(exc)))
                log(f"skipped: {exc}")
                continue
            prob = inference.predict_image(
                model, image, dev, resolution, payload["data"]["size"], tile, overlap, batch_size
            )
            result.written.append(
                _write_outputs(path, image, prob, out_dir, threshold, save_probabilities, overlay)
            )
    skipped = f"; skipped {plural(len(result.skipped), 'unreadable image')}" if result.skipped else ""
    log(f"wrote {plural(len(result.written), 'mask')} to {out_dir}{skipped}")
    return result
