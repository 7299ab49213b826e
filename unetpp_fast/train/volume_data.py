"""Volumes (CT / MR scans) with segmentation masks: finding, reading, normalising, patch sampling.

Folder layout (one image and one mask per case, matched by file name without extension):

    <root>/images/<id>.nii.gz | <id>.nii | <id>.npy | <id>.npz
    <root>/masks/<id>.<any of the same extensions>      (foreground where the value is > 0.5)

A `.npz` file holds one array, or the arrays `image` / `mask`. NIfTI needs `nibabel` (the
`volumes` extra: `pip install unetpp-fast[volumes]`). Arrays are used in their stored axis order
(NIfTI: x, y, z), as [D, H, W]; image and mask must have the same three sizes.

    data = load_volumes("volumes/", hu_window=(-1000, 400))     # CT: clip to the window, scale to [0, 1]
    train, val = split_dataset(data, 0.2, seed=41)               # data.split_dataset works on it
    samples = VolumePatches(train, seed=41, patch=64, augment=True, batch_size=2)

Intensities are normalised once, at load: a CT window (HU clipped to [low, high], mapped to
[0, 1]) or, without one, each volume's own mean and standard deviation (z-score). Training draws
random patch x patch x patch windows; a share `foreground` of them is centred (with jitter) on a
random foreground voxel, as nodule pipelines sample, since nodules are a tiny part of a scan.
Problems with the files raise `DatasetError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from unetpp_fast.train.data import DatasetError

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".npy", ".npz")
LAYOUT = "volumes"
DEFAULT_FOREGROUND = 0.5


def volume_stem(name: str) -> str | None:
    """The case id of a volume file name, or None for a file that is not a volume."""
    if name.startswith("."):
        return None
    for ext in VOLUME_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return None


def _volume_files(folder: str) -> dict[str, str]:
    """{case id: file name} of the volume files in `folder`; two files of one id are an error."""
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem = volume_stem(name)
        if stem is None or not os.path.isfile(os.path.join(folder, name)):
            continue
        if stem in found:
            raise DatasetError(
                f"{os.path.join(folder, name)!r} and {found[stem]!r} are two volumes of case {stem!r}"
            )
        found[stem] = name
    return found


def is_volume_folder(root: str) -> bool:
    """True for a folder with images/ holding at least one volume file (.nii, .nii.gz, .npy, .npz)."""
    image_dir = os.path.join(os.path.expanduser(str(root)), "images")
    return os.path.isdir(image_dir) and bool(_volume_files(image_dir))


def find_volume_pairs(root: str) -> list[tuple[str, str, str]]:
    """(case id, image path, mask path) of every case, sorted by id; DatasetError for a bad folder."""
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DatasetError(f"volume folder {root!r} does not exist or is not a folder")
    image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    if not os.path.isdir(image_dir):
        raise DatasetError(f"volume folder {root!r} has no images/ folder (expected images/<id>.nii.gz|.npy)")
    images = _volume_files(image_dir)
    if not images:
        raise DatasetError(
            f"image folder {image_dir!r} holds no volume files ({', '.join(VOLUME_EXTENSIONS)})"
        )
    if not os.path.isdir(mask_dir):
        raise DatasetError(f"volume folder {root!r} has images/ but no masks/ folder")
    masks = _volume_files(mask_dir)
    pairs = []
    for case, name in images.items():
        if case not in masks:
            raise DatasetError(
                f"volume {os.path.join(image_dir, name)!r} has no mask: expected "
                f"{os.path.join(mask_dir, case)}.<nii.gz|nii|npy|npz>"
            )
        pairs.append((case, os.path.join(image_dir, name), os.path.join(mask_dir, masks[case])))
    return pairs


def _nibabel():  # noqa: ANN202 - the optional module
    try:
        import nibabel
    except ImportError:
        raise DatasetError(
            "reading NIfTI volumes needs nibabel: pip install 'unetpp-fast[volumes]' (or pip install nibabel)"
        ) from None
    return nibabel


def _read_npz(path: str, role: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.keys())
        if role in keys:
            return archive[role]
        if len(keys) == 1:
            return archive[keys[0]]
    raise DatasetError(f"{path!r} holds the arrays {keys}: expected one array, or one named {role!r}")


def read_volume_array(path: str, role: str = "image") -> np.ndarray:
    """A volume file as a 3-D numpy array (role 'image' or 'mask': the array name looked up in .npz)."""
    lower = path.lower()
    try:
        if lower.endswith((".nii", ".nii.gz")):
            array = np.asarray(_nibabel().load(path).dataobj)
        elif lower.endswith(".npz"):
            array = _read_npz(path, role)
        else:
            array = np.load(path, allow_pickle=False)
    except DatasetError:
        raise
    except Exception as exc:  # numpy and nibabel raise many types for damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"cannot read volume {path!r}: {first}") from None
    if array.ndim != 3 or array.size == 0:
        raise DatasetError(f"volume {path!r} has shape {array.shape}, expected 3 dimensions (D, H, W)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DatasetError(f"volume {path!r} has unsupported value type {array.dtype}")
    return array


def normalise_intensity(volume: np.ndarray, hu_window: tuple[float, float] | None) -> np.ndarray:
    """float32 network input: a CT window clipped and scaled to [0, 1], or the volume's z-score."""
    volume = volume.astype(np.float32, copy=False)
    if hu_window is not None:
        low, high = hu_window
        return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)
    std = float(volume.std())
    return ((volume - float(volume.mean())) / (std if std > 0 else 1.0)).astype(np.float32)


def check_hu_window(hu_window: Sequence[float] | None) -> tuple[float, float] | None:
    if hu_window is None:
        return None
    if len(hu_window) != 2 or not float(hu_window[0]) < float(hu_window[1]):
        raise ValueError(f"hu_window must be (low, high) with low < high, got {tuple(hu_window)!r}")
    return float(hu_window[0]), float(hu_window[1])


@dataclass
class VolumeDataset:
    """Normalised volumes float32 [1, D, H, W] and masks bool [1, D, H, W], one of each per case."""

    ids: list[str]
    images: list[torch.Tensor]
    masks: list[torch.Tensor]
    root: str = ""
    layout: str = LAYOUT
    hu_window: tuple[float, float] | None = None
    files: list[str] = field(default_factory=list)  # the image file of each case (predict writes beside)

    native = True  # cases keep their own sizes, as a native-resolution image dataset
    spatial_dims = 3

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> VolumeDataset:
        keep = [int(i) for i in indices]
        files = [self.files[i] for i in keep] if self.files else []
        return VolumeDataset(
            [self.ids[i] for i in keep],
            [self.images[i] for i in keep],
            [self.masks[i] for i in keep],
            self.root,
            self.layout,
            self.hu_window,
            files,
        )


def load_volume_case(
    image_path: str, mask_path: str, hu_window: tuple[float, float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [1, D, H, W] normalised image, bool [1, D, H, W] mask) of one case."""
    image = read_volume_array(image_path, "image")
    mask = read_volume_array(mask_path, "mask")
    if mask.shape != image.shape:
        raise DatasetError(
            f"mask {mask_path!r} has shape {mask.shape} but its volume {image_path!r} {image.shape}"
        )
    normalised = normalise_intensity(image, hu_window)
    return torch.from_numpy(normalised)[None].contiguous(), torch.from_numpy(mask > 0.5)[None].contiguous()


def load_volumes(
    root: str,
    hu_window: Sequence[float] | None = None,
    limit: int | None = None,
    seed: int = 41,
    progress: bool = False,
) -> VolumeDataset:
    """Read a volume folder into memory (normalised float32 images, bool masks).

    limit: only that many cases, drawn with `seed` (the same ones on every run).
    """
    from unetpp_fast.train.data import select_ids

    window = check_hu_window(hu_window)
    pairs = find_volume_pairs(root)
    pairs = [pairs[i] for i in select_ids([p[0] for p in pairs], limit, seed)]
    iterator: Sequence[tuple[str, str, str]] = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc="loading", unit="volume", leave=False)
    images, masks = [], []
    for _, image_path, mask_path in iterator:
        image, mask = load_volume_case(image_path, mask_path, window)
        images.append(image)
        masks.append(mask)
    return VolumeDataset(
        [p[0] for p in pairs],
        images,
        masks,
        os.path.abspath(str(root)),
        LAYOUT,
        window,
        [p[1] for p in pairs],
    )


# ----------------------------------------------------------------------------------------------
# training patches


def patch_corner(
    shape: Sequence[int], patch: int, centre: Sequence[int] | None, generator: torch.Generator
) -> list[int]:
    """The corner of a patch^3 window in a volume of `shape` (already padded to >= patch).

    centre: a voxel the window should hold, jittered by up to a quarter patch; None: uniform.
    """
    corner = []
    for axis, size in enumerate(shape):
        top = size - patch
        if centre is None:
            corner.append(int(torch.randint(0, top + 1, (1,), generator=generator)))
        else:
            jitter = int(torch.randint(-(patch // 4), patch // 4 + 1, (1,), generator=generator))
            corner.append(min(max(int(centre[axis]) - patch // 2 + jitter, 0), top))
    return corner


def pad_to_patch(image: torch.Tensor, mask: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [1, D, H, W] at the far end of each axis up to `patch` (image with its minimum: background)."""
    pads: list[int] = []
    for size in reversed(image.shape[1:]):
        pads += [0, max(patch - size, 0)]
    if not any(pads):
        return image, mask
    return F.pad(image, pads, value=float(image.min())), F.pad(mask, pads)


class VolumePatches(torch.utils.data.Dataset):
    """Random training patches of a VolumeDataset, `per_volume` per case and epoch, for a DataLoader.

    `set_epoch` draws every sample's window and flips from (seed, epoch) alone, so a resumed run,
    any worker and any rank see the same patches (as `data.TrainSamples`). A share `foreground` of
    the windows holds a random foreground voxel (cases without foreground get a uniform window).
    Flips: each axis independently with probability 1/2 (anisotropic CT spacing makes 90-degree
    rotations across axes a change of the data, so flips only).
    """

    def __init__(
        self,
        data: VolumeDataset,
        seed: int,
        patch: int,
        augment: bool,
        batch_size: int,
        foreground: float = DEFAULT_FOREGROUND,
        per_volume: int = 1,
    ) -> None:
        if not 0.0 <= foreground <= 1.0:
            raise ValueError(f"foreground must be in [0, 1], got {foreground}")
        if per_volume < 1 or patch < 1 or batch_size < 1:
            raise ValueError(
                f"per_volume, patch and batch_size must be >= 1, got {per_volume}, {patch}, {batch_size}"
            )
        self.data, self.seed, self.patch, self.augment = data, seed, patch, augment
        self.batch_size, self.foreground, self.per_volume = batch_size, foreground, per_volume
        # Foreground voxel coordinates of each case, once (a nodule is a few thousand voxels).
        self.foreground_voxels = [torch.nonzero(mask[0]) for mask in data.masks]
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.data) * self.per_volume

    def set_epoch(self, epoch: int) -> None:
        from unetpp_fast.train.data import epoch_generator_seed

        generator = torch.Generator().manual_seed(epoch_generator_seed(self.seed, epoch) + 7)
        self.corners, self.flips = [], []
        for index in range(len(self)):
            case = index % len(self.data)
            shape = [max(s, self.patch) for s in self.data.images[case].shape[1:]]
            voxels = self.foreground_voxels[case]
            want_foreground = float(torch.rand((), generator=generator)) < self.foreground
            centre = None
            if want_foreground and len(voxels):
                centre = voxels[int(torch.randint(0, len(voxels), (1,), generator=generator))].tolist()
            self.corners.append(patch_corner(shape, self.patch, centre, generator))
            flips = torch.rand(3, generator=generator) < 0.5
            self.flips.append([axis + 1 for axis in range(3) if self.augment and bool(flips[axis])])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = index % len(self.data)
        image, mask = pad_to_patch(self.data.images[case], self.data.masks[case], self.patch)
        d, h, w = self.corners[index]
        p = self.patch
        image, mask = image[:, d : d + p, h : h + p, w : w + p], mask[:, d : d + p, h : h + p, w : w + p]
        if self.flips[index]:
            image, mask = image.flip(self.flips[index]), mask.flip(self.flips[index])
        return image.contiguous(), mask.contiguous()
