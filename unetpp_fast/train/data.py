"""The DSB2018 cell-nuclei data (the UNet++ paper's "Cell nuclei"): finding, reading, splitting, augmenting.

Two folder layouts are accepted:

* merged:  <root>/images/<id>.png and <root>/masks/<id>.png (one binary or interpolated mask per image);
* Kaggle:  <root>/<id>/images/<id>.png and <root>/<id>/masks/*.png (one PNG per nucleus, merged here
  into one binary mask), as in the 2018 Data Science Bowl `stage1_train` download and BBBC038v1.
  `<root>` may also be the folder that holds `stage1_train/`.

    data = load_dataset("../shared/data/dsb2018/96x96", size=96)
    train, val = split_dataset(data, val_fraction=0.2, seed=41)
    for images, masks in iterate_batches(train, 16, shuffle=True, augment=True, seed=41, epoch=0): ...

Images become RGB (grey is replicated, an alpha channel dropped) and are kept as uint8 tensors
[N, 3, size, size]; `normalize` turns a batch into the float network input. Masks are bool
[N, 1, size, size]. With `native=True` images keep their own sizes (lists of [3, H, W] and
[1, H, W] tensors) and `iterate_batches(..., crop=S)` draws random S x S crops from them.
Resizing uses scikit-image (bilinear with anti-aliasing for images; masks are
interpolated and thresholded at one half, as the paper's 96x96 preprocessing does).
Problems with the files raise `DatasetError` naming the file and what was expected.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
# ImageNet statistics, as the widely used pytorch-nested-unet DSB2018 pipeline normalises its inputs.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULT_SEED = 41


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class SampleFiles:
    """Where one sample lives: its image and the mask file(s) whose union is its mask."""

    sample_id: str
    image: str
    masks: tuple[str, ...]


@dataclass
class NucleiDataset:
    """Images and masks held in memory (96x96 DSB2018: 18 MiB of uint8; native resolution: ~400 MiB)."""

    ids: list[str]
    images: torch.Tensor | list[torch.Tensor]  # uint8 [N, 3, S, S], or native: N x [3, H, W]
    masks: torch.Tensor | list[torch.Tensor]  # bool  [N, 1, S, S], or native: N x [1, H, W]
    root: str = ""
    layout: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def native(self) -> bool:
        """Images at their own sizes (lists), not resized to one size (tensors)."""
        return isinstance(self.images, list)

    def subset(self, indices: Sequence[int]) -> NucleiDataset:
        keep = [int(i) for i in indices]
        if self.native:
            images: torch.Tensor | list[torch.Tensor] = [self.images[i] for i in keep]
            masks: torch.Tensor | list[torch.Tensor] = [self.masks[i] for i in keep]
        else:
            index = torch.as_tensor(keep, dtype=torch.long)
            images, masks = self.images[index], self.masks[index]
        return NucleiDataset([self.ids[i] for i in keep], images, masks, self.root, self.layout)


# ----------------------------------------------------------------------------------------------
# finding the files


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _image_files(folder: str) -> list[str]:
    return sorted(
        f for f in os.listdir(folder) if _is_image_file(f) and os.path.isfile(os.path.join(folder, f))
    )


def _require_dir(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DatasetError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise DatasetError(f"{what} {path!r} is not a folder")
    return path


def _looks_like_kaggle_sample(folder: str) -> bool:
    """A Kaggle sample folder <id>/images/ holds one image (named <id>); a merged dataset holds many."""
    image_dir = os.path.join(folder, "images")
    if not os.path.isdir(image_dir):
        return False
    images = _image_files(image_dir)
    return len(images) == 1 or any(_stem(f) == os.path.basename(folder) for f in images)


def detect_layout(root: str) -> tuple[str, str]:
    """('merged' | 'kaggle', folder) for a dataset folder, or DatasetError saying what was expected."""
    root = _require_dir(os.path.expanduser(str(root)), "data folder")
    if os.path.isdir(os.path.join(root, "images")):
        return "merged", root
    if os.path.isdir(os.path.join(root, "stage1_train")):
        return "kaggle", os.path.join(root, "stage1_train")
    subdirs = [
        e for e in sorted(os.listdir(root)) if not e.startswith(".") and os.path.isdir(os.path.join(root, e))
    ]
    if any(_looks_like_kaggle_sample(os.path.join(root, e)) for e in subdirs):
        return "kaggle", root
    datasets = [e for e in subdirs if os.path.isdir(os.path.join(root, e, "images"))]
    hint = f"; it holds the datasets {datasets}: pass one of them" if datasets else ""
    raise DatasetError(
        f"data folder {root!r} has neither images/ and masks/ (merged layout) nor <id>/images/<id>.png "
        f"sample folders (Kaggle DSB2018 stage1_train layout){hint}"
    )


def find_samples(root: str) -> tuple[str, list[SampleFiles]]:
    """(layout, samples sorted by id) of a dataset folder in either layout."""
    layout, folder = detect_layout(root)
    samples = _find_merged(folder) if layout == "merged" else _find_kaggle(folder)
    if not samples:
        raise DatasetError(f"data folder {folder!r} ({layout} layout) holds no images")
    return layout, samples


def _find_merged(root: str) -> list[SampleFiles]:
    image_dir = os.path.join(root, "images")
    mask_dir = os.path.join(root, "masks")
    images = _image_files(image_dir)
    if not images:
        raise DatasetError(f"image folder {image_dir!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if not os.path.isdir(mask_dir):
        raise DatasetError(f"data folder {root!r} has images/ but no masks/ folder (merged layout)")
    masks = {_stem(f): f for f in _image_files(mask_dir)}
    samples = []
    for name in images:
        mask = masks.get(_stem(name))
        if mask is None:
            raise DatasetError(
                f"image {os.path.join(image_dir, name)!r} has no mask: expected "
                f"{os.path.join(mask_dir, _stem(name) + '.png')!r}"
            )
        samples.append(
            SampleFiles(_stem(name), os.path.join(image_dir, name), (os.path.join(mask_dir, mask),))
        )
    return samples


def _find_kaggle(root: str) -> list[SampleFiles]:
    samples = []
    for sample_id in sorted(e for e in os.listdir(root) if not e.startswith(".")):
        folder = os.path.join(root, sample_id)
        if not os.path.isdir(folder):
            continue
        image_dir = os.path.join(folder, "images")
        if not os.path.isdir(image_dir):
            raise DatasetError(f"sample folder {folder!r} has no images/ folder (Kaggle layout)")
        images = _image_files(image_dir)
        if not images:
            raise DatasetError(f"sample folder {image_dir!r} holds no image file")
        if len(images) > 1:
            preferred = [f for f in images if _stem(f) == sample_id]
            if len(preferred) != 1:
                raise DatasetError(f"sample folder {image_dir!r} holds {len(images)} images, expected one")
            images = preferred
        mask_dir = os.path.join(folder, "masks")
        masks = _image_files(mask_dir) if os.path.isdir(mask_dir) else []
        if not masks:
            raise DatasetError(
                f"image {os.path.join(image_dir, images[0])!r} has no mask: {mask_dir!r} holds no PNG"
            )
        samples.append(
            SampleFiles(
                sample_id, os.path.join(image_dir, images[0]), tuple(os.path.join(mask_dir, m) for m in masks)
            )
        )
    return samples


def unmatched_masks(root: str) -> list[str]:
    """Mask files of a merged-layout dataset that have no image (left out of the dataset)."""
    layout, folder = detect_layout(root)
    if layout != "merged" or not os.path.isdir(os.path.join(folder, "masks")):
        return []
    images = {_stem(f) for f in _image_files(os.path.join(folder, "images"))}
    masks = _image_files(os.path.join(folder, "masks"))
    return [os.path.join(folder, "masks", f) for f in masks if _stem(f) not in images]


def find_images(path: str) -> list[str]:
    """Image files to segment: one file, a folder of images, or a dataset folder in either layout."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        if not _is_image_file(os.path.basename(path)):
            raise DatasetError(f"{path!r} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [path]
    _require_dir(path, "input folder")
    direct = _image_files(path)
    if direct:
        return [os.path.join(path, f) for f in direct]
    try:
        layout, folder = detect_layout(path)
    except DatasetError:
        raise DatasetError(
            f"input folder {path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        ) from None
    if layout == "merged":
        images = _image_files(os.path.join(folder, "images"))
        return [os.path.join(folder, "images", f) for f in images]
    out = []
    for sample_id in sorted(os.listdir(folder)):
        image_dir = os.path.join(folder, sample_id, "images")
        if os.path.isdir(image_dir):
            out += [os.path.join(image_dir, f) for f in _image_files(image_dir)]
    if not out:
        raise DatasetError(f"input folder {path!r} holds no image files")
    return out


# ----------------------------------------------------------------------------------------------
# reading


def _imread(path: str) -> np.ndarray:
    from skimage import io

    try:
        with warnings.catch_warnings():  # imageio warns about plugins it tried while probing a bad file
            warnings.simplefilter("ignore", DeprecationWarning)
            array = io.imread(path)
    except Exception as exc:  # imageio/PIL raise many types for unreadable files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Could not find a backend" in first_line:  # imageio's wording for bytes it cannot decode
            first_line = "not a readable image (unknown or damaged format)"
        raise DatasetError(f"cannot read image {path!r}: {first_line}") from None
    array = np.asarray(array)
    if array.size == 0 or array.ndim not in (2, 3):
        raise DatasetError(f"image {path!r} has shape {array.shape}, expected HxW or HxWxC")
    return array


def _to_uint8(array: np.ndarray, path: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = float(np.iinfo(array.dtype).max) if array.max() > 255 else 255.0
        return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        top = 1.0 if array.max() <= 1.0 else 255.0
        return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    raise DatasetError(f"image {path!r} has unsupported pixel type {array.dtype}")


def read_image(path: str) -> np.ndarray:
    """An image as uint8 RGB [H, W, 3]: grey replicated, grey+alpha and RGBA lose their alpha."""
    array = _to_uint8(_imread(path), path)
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    channels = array.shape[2]
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 2:  # grey + alpha
        return np.repeat(array[:, :, :1], 3, axis=2)
    if channels in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise DatasetError(f"image {path!r} has {channels} channels, expected 1 (grey), 2, 3 (RGB) or 4 (RGBA)")


def read_mask(paths: Sequence[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """The union of the mask files as bool [H, W] (a pixel is foreground above half intensity)."""
    union: np.ndarray | None = None
    for path in paths:
        array = _to_uint8(_imread(path), path)
        if array.ndim == 3:
            array = array[:, :, 0] if array.shape[2] in (1, 2) else array[:, :, :3].max(axis=2)
        mask = array > 127
        if shape is not None and mask.shape != tuple(shape):
            raise DatasetError(
                f"mask {path!r} is {mask.shape[0]}x{mask.shape[1]} but its image is {shape[0]}x{shape[1]}"
            )
        union = mask if union is None else (union | mask)
    if union is None:
        raise DatasetError("a sample has no mask file")
    return union


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3], bilinear with anti-aliasing when shrinking."""
    if image.shape[:2] == (size, size):
        return image
    from skimage.transform import resize

    shrink = image.shape[0] > size or image.shape[1] > size
    out = resize(image, (size, size), order=1, preserve_range=True, anti_aliasing=shrink)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool [H, W] -> bool [size, size]: interpolated, then thresholded at one half."""
    if mask.shape == (size, size):
        return mask
    from skimage.transform import resize

    shrink = mask.shape[0] > size or mask.shape[1] > size
    return resize(mask.astype(np.float32), (size, size), order=1, anti_aliasing=shrink) > 0.5


def load_sample(sample: SampleFiles, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [size, size, 3] image, bool [size, size] mask) of one sample."""
    image = read_image(sample.image)
    mask = read_mask(sample.masks, image.shape[:2])
    return resize_image(image, size), resize_mask(mask, size)


def _read_native(sample: SampleFiles) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [3, H, W], bool [1, H, W]) of one sample at its own size."""
    image = read_image(sample.image)
    mask = read_mask(sample.masks, image.shape[:2])
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)[None].contiguous()


def _check_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return size


def select_ids(ids: Sequence[str], limit: int | None, seed: int) -> list[int]:
    """Indices of `limit` samples drawn with `seed` (all when limit is None), in a fixed order."""
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        order = order[:limit]
    return sorted(order)


def load_dataset(
    root: str,
    size: int = 96,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
    native: bool = False,
) -> NucleiDataset:
    """Read a dataset folder (either layout) into memory at `size` x `size`, or at native resolution.

    limit: load only that many samples, drawn with `seed` (the same ones on every run).
    native: keep every image at its own size (then `size` is not used).
    """
    _check_size(size)
    layout, samples = find_samples(root)
    samples = [samples[i] for i in select_ids([s.sample_id for s in samples], limit, seed)]
    iterator: Sequence[SampleFiles] | Iterator[SampleFiles] = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc="loading", unit="image", leave=False)
    if native:
        pairs = [_read_native(sample) for sample in iterator]
        return NucleiDataset(
            [s.sample_id for s in samples],
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            os.path.abspath(str(root)),
            layout,
        )
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    masks = np.empty((len(samples), size, size), dtype=bool)
    for i, sample in enumerate(iterator):
        images[i], masks[i] = load_sample(sample, size)
    return NucleiDataset(
        ids=[s.sample_id for s in samples],
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(masks)[:, None].contiguous(),
        root=os.path.abspath(str(root)),
        layout=layout,
    )


def split_indices(n: int, val_fraction: float = 0.2, seed: int = DEFAULT_SEED) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index lists: a seeded permutation, the first part is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise DatasetError(f"need at least 2 samples to split into train and validation, got {n}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_dataset(
    data: NucleiDataset, val_fraction: float = 0.2, seed: int = DEFAULT_SEED
) -> tuple[NucleiDataset, NucleiDataset]:
    """(train, val) subsets; the same seed and ids give the same split on every machine."""
    train_idx, val_idx = split_indices(len(data), val_fraction, seed)
    return data.subset(train_idx), data.subset(val_idx)


# ----------------------------------------------------------------------------------------------
# network input, augmentation, batches


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 network input (ImageNet mean/std per channel)."""
    x = images.float().div_(255.0)
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: a random rotation by a multiple of 90 degrees and a random horizontal flip.

    Together they draw uniformly from the 8 symmetries of the square, applied alike to image and mask.
    """
    draws = torch.randint(0, 8, (images.shape[0],), generator=generator).tolist()
    out_images, out_masks = [], []
    for image, mask, draw in zip(images, masks, draws):
        k, flip = draw % 4, draw >= 4
        image, mask = torch.rot90(image, k, dims=(1, 2)), torch.rot90(mask, k, dims=(1, 2))
        if flip:
            image, mask = image.flip(2), mask.flip(2)
        out_images.append(image)
        out_masks.append(mask)
    return torch.stack(out_images), torch.stack(out_masks)


def random_crops(
    images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], crop: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random crop x crop window per image (zero-padded where an image is smaller), stacked."""
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):
        h, w = image.shape[-2:]
        if h < crop or w < crop:
            pad = (0, max(crop - w, 0), 0, max(crop - h, 0))
            image, mask = F.pad(image, pad), F.pad(mask, pad)
            h, w = image.shape[-2:]
        top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
        out_images.append(image[:, top : top + crop, left : left + crop])
        out_masks.append(mask[:, top : top + crop, left : left + crop])
    return torch.stack(out_images), torch.stack(out_masks)


def iterate_batches(
    data: NucleiDataset,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = DEFAULT_SEED,
    epoch: int = 0,
    crop: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, bool masks) batches; order, crops and augmentation depend only on (seed, epoch).

    Deriving them from (seed, epoch) makes a resumed run see exactly the batches it would have seen.
    crop: random crop x crop windows, required for a native-resolution dataset.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if data.native and not crop:
        raise ValueError("a native-resolution dataset has images of different sizes: pass crop")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        if crop:
            picked = index.tolist()
            images, masks = random_crops(
                [data.images[i] for i in picked], [data.masks[i] for i in picked], crop, generator
            )
        else:
            images, masks = data.images[index], data.masks[index]
        if augment:
            images, masks = augment_batch(images, masks, generator)
        yield images, masks


# ----------------------------------------------------------------------------------------------
# training samples for a DataLoader (worker processes, several ranks)


def epoch_generator_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's batch order: the one `iterate_batches` uses (and DistributedSampler's seed)."""
    return seed * 1_000_003 + epoch


class TrainSamples(torch.utils.data.Dataset):
    """Training samples for a DataLoader, augmented exactly as `iterate_batches` augments them.

    `set_epoch` replays iterate_batches' random stream for the *global* batch size once (a few
    numbers per sample) and keeps each sample's draws (crop corner, symmetry): whichever batch,
    worker or rank then loads sample i, it gets the same crop and symmetry as in a single process
    with that batch size. Call `set_epoch` before iterating (as for DistributedSampler, whose
    shuffle is the same permutation); the draws travel with the dataset into worker processes,
    which are therefore not persistent.
    """

    def __init__(
        self, data: NucleiDataset, seed: int, augment: bool, batch_size: int, crop: int | None = None
    ) -> None:
        if data.native and not crop:
            raise ValueError("a native-resolution dataset has images of different sizes: pass crop")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.seed, self.augment, self.crop, self.batch_size = data, seed, augment, crop, batch_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        n = len(self.data)
        generator = torch.Generator().manual_seed(epoch_generator_seed(self.seed, epoch))
        order = torch.randperm(n, generator=generator)  # drawn first, as in iterate_batches
        self.symmetry = torch.zeros(n, dtype=torch.long)
        self.corner = torch.zeros((n, 2), dtype=torch.long)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size].tolist()
            if self.crop:  # random_crops: top then left, per image of the batch
                for i in index:
                    h, w = (max(d, self.crop) for d in self.data.images[i].shape[-2:])
                    top = int(torch.randint(0, h - self.crop + 1, (1,), generator=generator))
                    left = int(torch.randint(0, w - self.crop + 1, (1,), generator=generator))
                    self.corner[i] = torch.tensor([top, left])
            if self.augment:  # augment_batch: one draw per image of the batch
                self.symmetry[index] = torch.randint(0, 8, (len(index),), generator=generator)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.data.images[i], self.data.masks[i]
        if self.crop:
            image, mask = _crop_at(image, mask, self.crop, self.corner[i].tolist())
        if self.augment:
            draw = int(self.symmetry[i])
            k, flip = draw % 4, draw >= 4
            image, mask = torch.rot90(image, k, dims=(1, 2)), torch.rot90(mask, k, dims=(1, 2))
            if flip:
                image, mask = image.flip(2), mask.flip(2)
        return image.contiguous(), mask.contiguous()


def _crop_at(
    image: torch.Tensor, mask: torch.Tensor, crop: int, corner: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop x crop window at (top, left), the image zero-padded first where it is smaller."""
    h, w = image.shape[-2:]
    if h < crop or w < crop:
        pad = (0, max(crop - w, 0), 0, max(crop - h, 0))
        image, mask = F.pad(image, pad), F.pad(mask, pad)
    top, left = corner
    return image[:, top : top + crop, left : left + crop], mask[:, top : top + crop, left : left + crop]


def train_loader(
    samples: TrainSamples,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Shuffled batches of `batch_size` (per process) from this rank's DistributedSampler shard.

    `samples.batch_size` is the global batch, batch_size * world_size.

    The sampler's permutation is the single-process order (`iterate_batches`' seed), and rank r
    takes positions r, r + world_size, ... of it, so the union of the ranks' k-th batches is the
    k-th batch of one process with batch_size * world_size. An epoch whose size is not a multiple of
    world_size repeats a few samples at its end (DistributedSampler pads the shards to equal length).
    Call `loader.sampler.set_epoch(e)` and `samples.set_epoch(e)` before each epoch.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if batch_size * world_size != samples.batch_size:
        raise ValueError(
            f"{world_size} x {batch_size} images per step do not make the global batch {samples.batch_size}"
        )
    sampler = DistributedSampler(
        samples,
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=epoch_generator_seed(seed, 0),
        drop_last=False,
    )
    return DataLoader(
        samples,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
    )
