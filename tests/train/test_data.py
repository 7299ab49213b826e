"""The DSB2018 loader: both folder layouts, image kinds, resizing, split, augmentation, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import io

from unetpp_fast.train import data
from unetpp_fast.train.synthetic_data import write_synthetic_dataset

DSB_ROOT = Path(
    os.environ.get("UNETPP_FAST_DSB2018", Path(__file__).resolve().parents[2].parent / "shared/data/dsb2018")
)


def _real(sub: str) -> Path:
    path = DSB_ROOT / sub
    if not (path / "images").is_dir():
        pytest.skip(f"DSB2018 data not found at {path} (set UNETPP_FAST_DSB2018 to the dsb2018 folder)")
    return path


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(str(path), array, check_contrast=False)


# ----------------------------------------------------------------------------------------------
# layouts and image kinds


def test_merged_layout_loads_and_resizes(tmp_path):
    image = np.zeros((20, 24, 3), np.uint8)
    image[:, :12] = 200
    mask = np.zeros((20, 24), np.uint8)
    mask[:, :12] = 255
    for i in range(3):
        _save(tmp_path / "images" / f"id{i}.png", image)
        _save(tmp_path / "masks" / f"id{i}.png", mask)
    ds = data.load_dataset(str(tmp_path), size=16)
    assert ds.layout == "merged" and ds.ids == ["id0", "id1", "id2"]
    assert ds.images.shape == (3, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.masks.shape == (3, 1, 16, 16) and ds.masks.dtype == torch.bool
    # the left half is foreground after resizing, the right half background
    assert ds.masks[:, :, :, :7].all() and not ds.masks[:, :, :, 9:].any()
    assert (ds.images[:, :, :, :7] > 180).all() and (ds.images[:, :, :, 9:] < 20).all()


def test_kaggle_layout_merges_per_nucleus_masks_and_drops_alpha(tmp_path):
    root = tmp_path / "stage1_train"
    sid = "abc123"
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 255
    _save(root / sid / "images" / f"{sid}.png", rgba)
    first = np.zeros((16, 16), np.uint8)
    first[2:6, 2:6] = 255
    second = np.zeros((16, 16), np.uint8)
    second[10:14, 8:12] = 255
    _save(root / sid / "masks" / "n1.png", first)
    _save(root / sid / "masks" / "n2.png", second)
    grey_id = "grey01"
    _save(root / grey_id / "images" / f"{grey_id}.png", np.full((16, 16), 77, np.uint8))
    _save(root / grey_id / "masks" / "n1.png", first)

    # the stage1_train folder itself and its parent are both accepted
    for given in (root, tmp_path):
        ds = data.load_dataset(str(given), size=16)
        assert ds.layout == "kaggle" and ds.ids == [sid, grey_id]
        union = (first > 0) | (second > 0)
        assert torch.equal(ds.masks[0, 0], torch.from_numpy(union))
        assert ds.images[0, :, 0, 0].tolist() == [10, 20, 30]  # RGB kept, alpha dropped
        assert ds.images[1, :, 0, 0].tolist() == [77, 77, 77]  # grey replicated


def test_synthetic_kaggle_and_merged_layouts_agree(tmp_path):
    write_synthetic_dataset(str(tmp_path / "merged"), n=4, size=32, layout="merged", seed=3)
    write_synthetic_dataset(str(tmp_path / "kaggle"), n=4, size=32, layout="kaggle", seed=3, rgba=True)
    merged = data.load_dataset(str(tmp_path / "merged"), size=32)
    kaggle = data.load_dataset(str(tmp_path / "kaggle"), size=32)
    assert merged.ids == kaggle.ids
    assert torch.equal(merged.images, kaggle.images)
    assert torch.equal(merged.masks, kaggle.masks)
    assert 0.02 < merged.masks.float().mean() < 0.6


def test_sixteen_bit_and_float_images_are_scaled(tmp_path):
    _save(tmp_path / "images" / "a.png", np.full((8, 8), 65535, np.uint16))
    _save(tmp_path / "masks" / "a.png", np.full((8, 8), 255, np.uint8))
    ds = data.load_dataset(str(tmp_path), size=8)
    assert ds.images.max() == 255 and ds.masks.all()


def test_find_images_accepts_file_folder_and_dataset_layouts(tmp_path):
    write_synthetic_dataset(str(tmp_path / "merged"), n=3, size=16)
    write_synthetic_dataset(str(tmp_path / "kaggle"), n=2, size=16, layout="kaggle")
    assert len(data.find_images(str(tmp_path / "merged"))) == 3
    assert len(data.find_images(str(tmp_path / "merged" / "images"))) == 3
    assert len(data.find_images(str(tmp_path / "kaggle"))) == 2
    one = data.find_images(str(tmp_path / "merged" / "images" / "sample000.png"))
    assert one == [str(tmp_path / "merged" / "images" / "sample000.png")]


# ----------------------------------------------------------------------------------------------
# errors


def _merged(tmp_path: Path, n: int = 2) -> Path:
    write_synthetic_dataset(str(tmp_path / "ds"), n=n, size=16)
    return tmp_path / "ds"


def test_missing_folder(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load_dataset(str(tmp_path / "nope"))


def test_not_a_dataset_folder_names_the_layouts(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(data.DatasetError, match="merged layout.*Kaggle"):
        data.load_dataset(str(tmp_path))


def test_parent_of_datasets_suggests_them(tmp_path):
    write_synthetic_dataset(str(tmp_path / "96x96"), n=2, size=16)
    write_synthetic_dataset(str(tmp_path / "full"), n=2, size=16)
    with pytest.raises(data.DatasetError, match=r"\['96x96', 'full'\]: pass one of them"):
        data.load_dataset(str(tmp_path))


def test_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(data.DatasetError, match="holds no image files"):
        data.load_dataset(str(tmp_path))


def test_image_without_mask_merged(tmp_path):
    root = _merged(tmp_path)
    os.remove(root / "masks" / "sample001.png")
    with pytest.raises(data.DatasetError, match="sample001.png' has no mask"):
        data.load_dataset(str(root))


def test_image_without_mask_kaggle(tmp_path):
    write_synthetic_dataset(str(tmp_path), n=2, size=16, layout="kaggle")
    for f in (tmp_path / "sample001" / "masks").iterdir():
        f.unlink()
    with pytest.raises(data.DatasetError, match="has no mask"):
        data.load_dataset(str(tmp_path))


def test_corrupt_and_truncated_images(tmp_path):
    root = _merged(tmp_path)
    target = root / "images" / "sample000.png"
    good = target.read_bytes()
    target.write_bytes(b"this is not a png")
    with pytest.raises(data.DatasetError, match="cannot read image .*sample000.png"):
        data.load_dataset(str(root))
    target.write_bytes(good[: len(good) // 3])
    with pytest.raises(data.DatasetError, match="cannot read image .*sample000.png"):
        data.load_dataset(str(root))


def test_mask_size_mismatch(tmp_path):
    root = _merged(tmp_path)
    _save(root / "masks" / "sample000.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(data.DatasetError, match="10x10 but its image is 16x16"):
        data.load_dataset(str(root))


def test_bad_arguments(tmp_path):
    root = _merged(tmp_path, n=3)
    with pytest.raises(ValueError, match="size"):
        data.load_dataset(str(root), size=0)
    with pytest.raises(ValueError, match="limit"):
        data.load_dataset(str(root), limit=0)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_indices(10, val_fraction=1.0)
    with pytest.raises(data.DatasetError, match="at least 2 samples"):
        data.split_indices(1)


# ----------------------------------------------------------------------------------------------
# split, limit, augmentation, batches


def test_split_is_deterministic_disjoint_and_complete():
    train, val = data.split_indices(100, 0.2, seed=7)
    assert (train, val) == data.split_indices(100, 0.2, seed=7)
    assert len(val) == 20 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert data.split_indices(100, 0.2, seed=8) != (train, val)


def test_limit_draws_the_same_subset(tmp_path):
    root = _merged(tmp_path, n=10)
    a = data.load_dataset(str(root), limit=4, seed=5)
    b = data.load_dataset(str(root), limit=4, seed=5)
    assert a.ids == b.ids and len(a) == 4 and torch.equal(a.images, b.images)


def test_augmentation_moves_image_and_mask_together():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    masks = images[:, :1] > 127
    out_images, out_masks = data.augment_batch(images, masks, generator)
    assert torch.equal(out_masks, out_images[:, :1] > 127)
    assert not torch.equal(out_images, images)  # 16 draws from 8 symmetries: some are not the identity
    # every output is one of the 8 symmetries of its input
    for src, dst in zip(images, out_images):
        candidates = [torch.rot90(src, k, (1, 2)) for k in range(4)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(dst, c) for c in candidates)


def test_batches_depend_only_on_seed_and_epoch(tmp_path):
    ds = data.load_dataset(str(_merged(tmp_path, n=6)), size=16)

    def run(epoch):
        return [b for b, _ in data.iterate_batches(ds, 4, shuffle=True, augment=True, seed=1, epoch=epoch)]

    first, again, other = run(0), run(0), run(1)
    assert [b.shape[0] for b in first] == [4, 2]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_normalize():
    x = data.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    expected = [(1 - m) / s for m, s in zip(data.MEAN, data.STD)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))


# ----------------------------------------------------------------------------------------------
# the real data (skipped when it is not beside the repository)


def test_real_96x96_folder():
    ds = data.load_dataset(str(_real("96x96")), size=96)
    assert len(ds) == 670 and ds.images.shape == (670, 3, 96, 96)
    assert 0.05 < ds.masks.float().mean() < 0.3  # nuclei cover about 14% of the pixels
    train, val = data.split_dataset(ds, 0.2, seed=41)
    assert len(train) == 536 and len(val) == 134


def test_real_full_resolution_resized_matches_the_paper_preprocessing():
    full = data.load_dataset(str(_real("full")), size=96, limit=6, seed=3)
    small = data.load_dataset(str(_real("96x96")), size=96, limit=6, seed=3)
    assert full.ids == small.ids
    disagreement = (full.masks != small.masks).float().mean()
    assert disagreement < 0.05, f"resized masks differ from the 96x96 set on {disagreement:.1%} of pixels"
