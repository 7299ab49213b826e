"""Volumes: the synthetic nodule set, the folder loader (NumPy and NIfTI), normalisation, patches, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unetpp_fast.train.data import DatasetError, split_dataset
from unetpp_fast.train.synthetic_volumes import ellipsoid_occupancy, synthetic_volume, write_synthetic_volumes
from unetpp_fast.train.volume_data import (
    VolumePatches,
    find_volume_pairs,
    is_volume_folder,
    load_volumes,
    normalise_intensity,
)


@pytest.fixture(scope="module")
def npy_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("volumes")
    write_synthetic_volumes(str(root), count=6, size=32, seed=3, file_format="npy")
    return root


def test_synthetic_volume_has_partial_volume_edges_and_hu_values():
    rng = np.random.default_rng(0)
    volume, mask = synthetic_volume(48, rng, nodules=2)
    assert volume.shape == mask.shape == (48, 48, 48) and mask.dtype == np.bool_
    assert 50 < mask.sum() < 48**3 // 4
    # Nodules are tissue (around 0 HU), the background is lung (around -850 HU).
    assert volume[mask].mean() > -300 > volume[~mask].mean()
    share = ellipsoid_occupancy(
        24, np.array([12.0, 12.0, 12.0], np.float32), np.array([5.0, 5.0, 5.0], np.float32), np.eye(3)
    )
    partial = (share > 0) & (share < 1)
    assert share[12, 12, 12] == 1 and share[0, 0, 0] == 0 and partial.sum() > 100
    # The mask is the voxels at least half inside: a sphere of radius 5 holds about 4/3 pi 125 of them.
    assert abs(int((share >= 0.5).sum()) - 4 / 3 * np.pi * 125) < 0.1 * 4 / 3 * np.pi * 125


def test_generator_writes_empty_and_nodule_cases(npy_set):
    pairs = find_volume_pairs(str(npy_set))
    assert [p[0] for p in pairs] == [f"case{i:03d}" for i in range(6)]
    masks = [np.load(p[2]) for p in pairs]
    images = [np.load(p[1]) for p in pairs]
    assert images[0].dtype == np.int16 and images[0].shape == (32, 32, 32)
    empty = [int(m.sum()) == 0 for m in masks]
    assert 1 <= sum(empty) < 6  # some patches without nodules, most with
    assert is_volume_folder(str(npy_set))


def test_load_normalises_with_a_ct_window_or_zscore(npy_set):
    data = load_volumes(str(npy_set), hu_window=(-1000, 400))
    assert (
        len(data) == 6 and data.images[0].shape == (1, 32, 32, 32) and data.images[0].dtype == torch.float32
    )
    raw = np.load(npy_set / "images" / "case003.npy").astype(np.float32)
    expected = (np.clip(raw, -1000, 400) + 1000) / 1400
    assert torch.allclose(data.images[3][0], torch.from_numpy(expected), atol=1e-6)
    assert torch.equal(data.masks[3][0], torch.from_numpy(np.load(npy_set / "masks" / "case003.npy") > 0))
    z = normalise_intensity(raw, None)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4
    train, val = split_dataset(data, 0.34, seed=41)
    assert len(train) + len(val) == 6 and not set(train.ids) & set(val.ids)
    with pytest.raises(ValueError, match="hu_window"):
        load_volumes(str(npy_set), hu_window=(400, -1000))


def test_nifti_and_npz_volumes_load_like_npy(tmp_path, npy_set):
    nibabel = pytest.importorskip("nibabel")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.load(npy_set / "images" / "case002.npy")
    mask = np.load(npy_set / "masks" / "case002.npy")
    nibabel.save(nibabel.Nifti1Image(image, np.eye(4)), str(tmp_path / "images" / "a.nii.gz"))
    np.savez(tmp_path / "masks" / "a.npz", mask=mask)
    data = load_volumes(str(tmp_path), hu_window=(-1000, 400))
    reference = load_volumes(str(npy_set), hu_window=(-1000, 400))
    assert data.ids == ["a"]
    assert torch.equal(data.images[0], reference.images[2]) and torch.equal(data.masks[0], reference.masks[2])


def _case(root: Path, name: str, image_shape=(8, 8, 8), mask_shape=(8, 8, 8), mask=True) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    np.save(root / "images" / f"{name}.npy", np.zeros(image_shape, np.int16))
    if mask:
        np.save(root / "masks" / f"{name}.npy", np.zeros(mask_shape, np.uint8))


def test_bad_folders_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_volumes(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="no images/ folder"):
        load_volumes(str(tmp_path))
    _case(tmp_path / "a", "c1", mask=False)
    with pytest.raises(DatasetError, match=r"c1\.npy'.*has no mask"):
        load_volumes(str(tmp_path / "a"))
    _case(tmp_path / "b", "c2", mask_shape=(8, 8, 7))
    with pytest.raises(DatasetError, match=r"masks/c2\.npy'.*shape"):
        load_volumes(str(tmp_path / "b"))
    _case(tmp_path / "c", "c3", image_shape=(8, 8))
    with pytest.raises(DatasetError, match=r"c3\.npy'.*3 dimensions"):
        load_volumes(str(tmp_path / "c"))
    _case(tmp_path / "d", "c4")
    (tmp_path / "d" / "images" / "c4.npy").write_bytes(b"not numpy")
    with pytest.raises(DatasetError, match=r"cannot read volume .*c4\.npy"):
        load_volumes(str(tmp_path / "d"))
    _case(tmp_path / "e", "c5", mask=False)
    np.savez(tmp_path / "e" / "masks" / "c5.npz", x=np.zeros((8, 8, 8)), y=np.zeros((8, 8, 8)))
    with pytest.raises(DatasetError, match=r"c5\.npz'.*'mask'"):
        load_volumes(str(tmp_path / "e"))


def test_patches_are_deterministic_foreground_biased_and_flipped_alike(npy_set):
    data = load_volumes(str(npy_set), hu_window=(-1000, 400))
    with_nodule = [i for i, m in enumerate(data.masks) if m.any()]
    patches = VolumePatches(data, seed=5, patch=16, augment=True, batch_size=2, foreground=1.0, per_volume=3)
    assert len(patches) == 18
    for index in range(len(patches)):
        image, mask = patches[index]
        assert image.shape == mask.shape == (1, 16, 16, 16)
        if index % 6 in with_nodule:  # foreground=1: every window of a nodule case holds nodule voxels
            assert mask.any()
        # the same window and flips of image and mask: the flipped-back patch is where the corner says
        d, h, w = patches.corners[index]
        flips = patches.flips[index]
        source = data.images[index % 6][:, d : d + 16, h : h + 16, w : w + 16]
        assert torch.equal(image.flip(flips) if flips else image, source)
        source_mask = data.masks[index % 6][:, d : d + 16, h : h + 16, w : w + 16]
        assert torch.equal(mask.flip(flips) if flips else mask, source_mask)
    assert any(patches.flips)
    first = [patches[i][0] for i in range(4)]
    patches.set_epoch(1)
    assert patches.corners != VolumePatches(data, 5, 16, True, 2, 1.0, 3).corners
    patches.set_epoch(0)
    assert all(torch.equal(a, patches[i][0]) for i, a in enumerate(first))


def test_uniform_patches_and_volumes_smaller_than_the_patch(npy_set):
    data = load_volumes(str(npy_set), hu_window=(-1000, 400))
    patches = VolumePatches(data, seed=5, patch=40, augment=False, batch_size=1, foreground=0.0)
    image, mask = patches[1]
    assert image.shape == (1, 40, 40, 40) and not any(patches.flips)
    # padded at the far end with the volume's minimum (background), the volume itself unchanged
    assert torch.equal(image[:, :32, :32, :32], data.images[1]) and float(image[:, 32:].max()) == float(
        data.images[1].min()
    )
    with pytest.raises(ValueError, match="foreground"):
        VolumePatches(data, seed=5, patch=16, augment=False, batch_size=1, foreground=1.5)
