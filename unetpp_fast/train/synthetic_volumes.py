"""A synthetic lung-nodule set: CT-like volumes in Hounsfield units with ellipsoid nodules and masks.

LIDC-IDRI (the UNet++ paper's 3D task) cannot be shipped; this stands in for tests and demos.
Each volume is lung parenchyma (about -850 HU, a smooth low-frequency variation and noise) with
0..`max_nodules` rotated ellipsoid nodules (about -50..+100 HU, radii 2..9 voxels at 64^3).
Nodule edges carry partial volume: a voxel's intensity follows the share of it inside the
ellipsoid (a one-voxel ramp); the mask is the voxels at least half inside. A share `empty` of
the volumes holds no nodule, as many patches of a real scan do.

    write_synthetic_volumes("volumes/", count=16, size=64)             # images/ + masks/ as .npy
    write_synthetic_volumes("volumes/", count=16, file_format="nifti")  # .nii.gz (needs nibabel)
"""

from __future__ import annotations

import os

import numpy as np

FORMATS = ("npy", "nifti", "auto")
LUNG_HU = -850.0
NODULE_HU = (-50.0, 100.0)
NOISE_HU = 40.0


def nibabel_available() -> bool:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        return False
    return True


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def ellipsoid_occupancy(size: int, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Share of each voxel inside the ellipsoid, float32 [size]^3: 1 inside, 0 outside, a ramp between.

    The ramp is one voxel wide across the surface (distance along the ellipsoid's normalised
    radius, scaled by its mean radius): the partial-volume effect of a scanner's voxel grid.
    """
    grid = np.stack(np.meshgrid(*(np.arange(size, dtype=np.float32),) * 3, indexing="ij"), axis=-1)
    local = (grid - centre) @ rotation  # coordinates along the ellipsoid's axes
    radius = np.sqrt(((local / radii) ** 2).sum(axis=-1))
    return np.clip((1.0 - radius) * float(radii.mean()) + 0.5, 0.0, 1.0).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Lung parenchyma: -850 HU, a smooth variation of +-60 HU across the volume."""
    axes = np.linspace(0.0, 1.0, size, dtype=np.float32)
    d, h, w = np.meshgrid(axes, axes, axes, indexing="ij")
    a, b, c = rng.uniform(-1.0, 1.0, 3)
    phase = rng.uniform(0.0, 2 * np.pi)
    return (LUNG_HU + 60.0 * np.sin(2 * np.pi * (a * d + b * h + c * w) / 2 + phase)).astype(np.float32)


def synthetic_volume(size: int, rng: np.random.Generator, nodules: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 HU volume [size]^3, bool mask [size]^3) with `nodules` ellipsoids."""
    volume = _background(size, rng)
    occupancy = np.zeros((size,) * 3, dtype=np.float32)
    scale = size / 64.0
    for _ in range(nodules):
        radii = rng.uniform(2.0, 9.0, 3).astype(np.float32) * scale
        radii = np.maximum(radii, radii.max() * 0.6)  # roundish, as nodules are
        centre = rng.uniform(radii.max() + 1, size - radii.max() - 1, 3).astype(np.float32)
        share = ellipsoid_occupancy(size, centre, radii, _random_rotation(rng).astype(np.float32))
        volume += share * (rng.uniform(*NODULE_HU) - volume) * (share > occupancy)
        occupancy = np.maximum(occupancy, share)
    volume += rng.normal(0.0, NOISE_HU, volume.shape).astype(np.float32)
    return volume, occupancy >= 0.5


def _resolve_format(file_format: str) -> str:
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
    if file_format == "auto":
        return "nifti" if nibabel_available() else "npy"
    if file_format == "nifti" and not nibabel_available():
        raise ValueError("file_format 'nifti' needs nibabel: pip install 'unetpp-fast[volumes]'")
    return file_format


def _save(path_stem: str, array: np.ndarray, file_format: str) -> str:
    if file_format == "npy":
        np.save(path_stem + ".npy", array)
        return path_stem + ".npy"
    import nibabel

    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), path_stem + ".nii.gz")
    return path_stem + ".nii.gz"


def write_synthetic_volumes(
    root: str,
    count: int = 16,
    size: int = 64,
    seed: int = 0,
    file_format: str = "npy",
    max_nodules: int = 2,
    empty: float = 0.25,
) -> list[str]:
    """Write `count` cases as root/images/<id> (int16 HU) and root/masks/<id> (uint8); returns the ids.

    file_format: 'npy', 'nifti' (.nii.gz, needs nibabel) or 'auto' (NIfTI when nibabel is installed).
    empty: the share of cases without a nodule (at least one case has nodules when count > 1).
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    if not 0.0 <= empty < 1.0:
        raise ValueError(f"empty must be in [0, 1), got {empty!r}")
    file_format = _resolve_format(file_format)
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    n_empty = min(int(round(count * empty)), count - 1)
    ids = []
    for index in range(count):
        case = f"case{index:03d}"
        nodules = 0 if index < n_empty else int(rng.integers(1, max_nodules + 1))
        volume, mask = synthetic_volume(size, rng, nodules)
        hu = np.clip(np.round(volume), -1024, 3071).astype(np.int16)
        _save(os.path.join(root, "images", case), hu, file_format)
        _save(os.path.join(root, "masks", case), mask.astype(np.uint8), file_format)
        ids.append(case)
    return ids
