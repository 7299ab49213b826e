"""Small synthetic nuclei-like datasets written as PNG files, in either DSB2018 folder layout.

For tests and smoke runs without the real data: bright discs (the "nuclei") on a dark noisy
background, with their masks; the Kaggle layout writes one mask PNG per disc, as DSB2018 does.

    write_synthetic_dataset("tmp/merged", n=12, size=32)                   # images/ + masks/
    write_synthetic_dataset("tmp/stage1_train", n=6, layout="kaggle")     # <id>/images, <id>/masks
"""

from __future__ import annotations

import os

import numpy as np

LAYOUTS = ("merged", "kaggle")


def synthetic_sample(
    size: int, rng: np.random.Generator, discs: int = 4
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(uint8 RGB image [size, size, 3], one bool mask per disc)."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = rng.normal(30.0, 8.0, (size, size)).clip(0, 255)
    masks = []
    for _ in range(discs):
        radius = rng.uniform(size / 12, size / 6)
        cy, cx = rng.uniform(radius, size - radius, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[disc] = rng.uniform(150, 230)
        masks.append(disc)
    tint = rng.uniform(0.8, 1.0, 3)
    rgb = (image[:, :, None] * tint[None, None, :]).clip(0, 255).astype(np.uint8)
    return rgb, masks


def write_synthetic_dataset(
    root: str, n: int = 12, size: int = 32, layout: str = "merged", seed: int = 0, rgba: bool = False
) -> list[str]:
    """Write `n` samples under `root`; returns their ids. rgba: save images with an alpha channel."""
    from skimage import io

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rng = np.random.default_rng(seed)
    ids = []
    for index in range(n):
        sample_id = f"sample{index:03d}"
        image, masks = synthetic_sample(size, rng)
        if rgba:
            image = np.concatenate([image, np.full((size, size, 1), 255, np.uint8)], axis=2)
        if layout == "merged":
            os.makedirs(os.path.join(root, "images"), exist_ok=True)
            os.makedirs(os.path.join(root, "masks"), exist_ok=True)
            union = np.any(masks, axis=0).astype(np.uint8) * 255
            io.imsave(os.path.join(root, "images", f"{sample_id}.png"), image, check_contrast=False)
            io.imsave(os.path.join(root, "masks", f"{sample_id}.png"), union, check_contrast=False)
        else:
            image_dir = os.path.join(root, sample_id, "images")
            mask_dir = os.path.join(root, sample_id, "masks")
            os.makedirs(image_dir, exist_ok=True)
            os.makedirs(mask_dir, exist_ok=True)
            io.imsave(os.path.join(image_dir, f"{sample_id}.png"), image, check_contrast=False)
            for k, mask in enumerate(masks):
                io.imsave(
                    os.path.join(mask_dir, f"nucleus{k}.png"),
                    mask.astype(np.uint8) * 255,
                    check_contrast=False,
                )
        ids.append(sample_id)
    return ids
