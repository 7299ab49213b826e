"""Segmenting whole volumes with a 3D checkpoint: sliding windows over each scan, masks beside it.

    result = predict_volumes("runs/nodules/best.pth", "scans/", "masks/")

INPUT is a volume file (.nii.gz, .nii, .npy, .npz), a folder of them, or a volume dataset folder
(images/ + masks/: its images are segmented). Each volume is normalised as the checkpoint's
training data was (its CT window, or z-score), run whole when it fits in `window`^3 voxels, else
as overlapping windows averaged (`volume_inference`), and written as <out>/<id>_mask.nii.gz
(uint8 0/1, with the input's affine) for a NIfTI input, else <out>/<id>_mask.npy; with
`save_probabilities`, also <id>_prob.nii.gz / <id>_prob.npy (float32).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from unetpp_fast.ops import backend_choice
from unetpp_fast.ops.backends import use_backend
from unetpp_fast.train import volume_data
from unetpp_fast.train.data import DatasetError
from unetpp_fast.train.evaluation import PredictResult
from unetpp_fast.train.inference import size_multiple
from unetpp_fast.train.text import plural
from unetpp_fast.train.training import count_parameters, load_trained, resolve_device
from unetpp_fast.train.volume_inference import DEFAULT_OVERLAP, DEFAULT_WINDOW, check_window, volume_logits


def is_3d_checkpoint(payload: dict[str, Any]) -> bool:
    return payload.get("model", {}).get("spatial_dims") == 3


def find_volume_inputs(path: str) -> list[str]:
    """Volume files to segment: one file, a folder of volume files, or a volume dataset's images/."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        if volume_data.volume_stem(os.path.basename(path)) is None:
            raise DatasetError(f"{path!r} is not a volume file ({', '.join(volume_data.VOLUME_EXTENSIONS)})")
        return [path]
    if not os.path.isdir(path):
        raise DatasetError(f"input {path!r} does not exist")
    for folder in (path, os.path.join(path, "images")):
        if os.path.isdir(folder):
            names = sorted(n for n in os.listdir(folder) if volume_data.volume_stem(n) is not None)
            files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
            if files:
                return files
    raise DatasetError(
        f"input folder {path!r} holds no volume files ({', '.join(volume_data.VOLUME_EXTENSIONS)}), "
        "neither directly nor in images/"
    )


def _output_stem(path: str, out_dir: str) -> str:
    stem = volume_data.volume_stem(os.path.basename(path)) or os.path.basename(path)
    return os.path.join(out_dir, stem)


def _save(path: str, stem: str, array: np.ndarray) -> str:
    """array beside `stem`: NIfTI with the input's affine for a NIfTI input, else .npy."""
    if path.lower().endswith((".nii", ".nii.gz")):
        import nibabel

        affine = nibabel.load(path).affine
        nibabel.save(nibabel.Nifti1Image(array, affine), stem + ".nii.gz")
        return stem + ".nii.gz"
    np.save(stem + ".npy", array)
    return stem + ".npy"


@torch.no_grad()
def predict_volumes(
    checkpoint: str,
    inputs: str,
    out_dir: str,
    device: str = "auto",
    backend: str = "auto",
    level: int | None = None,
    window: int | None = DEFAULT_WINDOW,
    overlap: float = DEFAULT_OVERLAP,
    threshold: float = 0.5,
    save_probabilities: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> PredictResult:
    """Segment every volume under `inputs` with a 3D checkpoint; see the module docstring.

    window: volumes larger than window^3 run as overlapping windows (None: always whole).
    level: the UNet++ pruned to head `level` (fast mode) instead of the accurate mode.
    """
    from tqdm import tqdm

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    dev = resolve_device(device)
    model, payload = load_trained(checkpoint, dev)
    if not is_3d_checkpoint(payload):
        raise ValueError(f"{payload['path']!r} is a 2D checkpoint: predict images with it, not volumes")
    if level is not None:
        if not getattr(model, "deep_supervision", False) or not 1 <= level <= model.depth:
            raise ValueError(f"--level must name a head (1..depth) of a deep-supervision UNet++, got {level}")
        model = model.pruned(level).eval()
    hu_window = payload.get("data", {}).get("hu_window")
    multiple = size_multiple(model)
    if window is not None:
        check_window(window, multiple)
    paths = find_volume_inputs(inputs)
    outputs = {
        os.path.realpath(_output_stem(p, out_dir) + "_mask" + ext)
        for p in paths
        for ext in (".npy", ".nii.gz")
    }
    if outputs & {os.path.realpath(p) for p in paths}:
        raise DatasetError(
            f"predicting into {out_dir!r} would overwrite an input volume: choose another --out"
        )
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
                "n_volumes": len(paths),
                "window": window,
                "hu_window": hu_window,
                "out_dir": out_dir,
            }
        )
    result = PredictResult(resolution="native")
    with use_backend(backend):
        for path in tqdm(paths, desc="predicting", unit="volume", disable=not progress):
            array = volume_data.read_volume_array(path, "image")
            image = volume_data.normalise_intensity(array, tuple(hu_window) if hu_window else None)
            volume = torch.from_numpy(image)[None]
            # window None: one window that holds the whole volume (a multiple of what the network needs)
            side = window or -(-max(volume.shape[1:]) // multiple) * multiple
            prob = torch.sigmoid(volume_logits(model, volume, dev, side, overlap))[0].numpy()
            stem = _output_stem(path, out_dir)
            result.written.append(_save(path, stem + "_mask", (prob > threshold).astype(np.uint8)))
            if save_probabilities:
                _save(path, stem + "_prob", prob.astype(np.float32))
    log(f"wrote {plural(len(result.written), 'mask')} to {out_dir}")
    return result
