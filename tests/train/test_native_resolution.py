"""Native resolution: crops for training, padding and tiles for inference; eval timing; overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetpp_fast.bench.plots import mask_overlay, stretch_contrast
from unetpp_fast.nn.unetpp import UNetPlusPlus
from unetpp_fast.train import data, evaluation, inference, training
from unetpp_fast.train.synthetic_data import write_synthetic_dataset


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _native_dataset() -> data.NucleiDataset:
    gen = torch.Generator().manual_seed(0)
    sizes = [(40, 56), (64, 48), (20, 24)]  # the last is smaller than the crop: padded
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]
    masks = [im[:1] > 128 for im in images]
    return data.NucleiDataset(["a", "b", "c"], images, masks)


def test_random_crops_are_square_aligned_and_repeatable():
    dataset = _native_dataset()
    first = list(data.iterate_batches(dataset, 2, shuffle=True, augment=True, seed=3, epoch=1, crop=32))
    again = list(data.iterate_batches(dataset, 2, shuffle=True, augment=True, seed=3, epoch=1, crop=32))
    other = list(data.iterate_batches(dataset, 2, shuffle=True, augment=True, seed=3, epoch=2, crop=32))
    assert [tuple(b[0].shape) for b in first] == [(2, 3, 32, 32), (1, 3, 32, 32)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    for images, masks in first:  # the mask travels with its image
        assert torch.equal(masks[:, 0], images[:, 0] > 128)
    with pytest.raises(ValueError, match="pass crop"):
        next(data.iterate_batches(dataset, 2))


def test_native_dataset_loads_images_at_their_own_size(tmp_path):
    write_synthetic_dataset(str(tmp_path / "ds"), n=4, size=40)
    native = data.load_dataset(str(tmp_path / "ds"), native=True)
    assert native.native and [tuple(im.shape) for im in native.images] == [(3, 40, 40)] * 4
    train, val = data.split_dataset(native, 0.25, 1)
    assert train.native and len(train) == 3 and tuple(val.masks[0].shape) == (1, 40, 40)
    with pytest.raises(ValueError, match="crop 20 must be a multiple of 8"):
        training.TrainConfig(data="x", filters=(4, 8, 16, 32), crop=20)


def test_masks_without_an_image_are_found(tmp_path):
    write_synthetic_dataset(str(tmp_path / "ds"), n=3, size=16)
    (tmp_path / "ds" / "masks" / "lost.png").write_bytes(
        (tmp_path / "ds" / "masks" / "sample000.png").read_bytes()
    )
    assert [p.rsplit("/", 1)[1] for p in data.unmatched_masks(str(tmp_path / "ds"))] == ["lost.png"]


def test_pad_to_multiple_reflects_and_keeps_the_image():
    x = torch.arange(2 * 3 * 10 * 13, dtype=torch.float32).view(2, 3, 10, 13)
    padded, (h, w) = inference.pad_to_multiple(x, 8)
    assert padded.shape == (2, 3, 16, 16) and (h, w) == (10, 13)
    assert torch.equal(padded[..., :10, :13], x) and torch.equal(padded[..., 10, :13], x[..., 8, :])
    tiny, _ = inference.pad_to_multiple(x[..., :3, :3], 8)  # too small to reflect: replicated
    assert tiny.shape[-2:] == (8, 8)


@pytest.fixture(scope="module")
def model() -> UNetPlusPlus:
    torch.manual_seed(0)
    return UNetPlusPlus(filters=(4, 8, 16), deep_supervision=True).eval()


def test_native_inference_runs_any_size_and_tiles_large_images(model, monkeypatch):
    x = torch.randn(1, 3, 50, 70)
    whole = inference.native_logits(model, x, tile=0)
    assert whole.shape == (1, 1, 50, 70)
    padded, _ = inference.pad_to_multiple(x, 4)
    assert torch.allclose(whole, model(padded)[..., :50, :70], atol=1e-5)
    tiled = inference.native_logits(model, x, tile=32, overlap=0.5)  # MONAI's sliding window
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    assert (torch.sigmoid(tiled) - torch.sigmoid(whole)).abs().mean() < 0.1  # the same picture, blended
    monkeypatch.setattr(inference, "monai_available", lambda: False)  # without MONAI: the whole image
    assert torch.equal(inference.native_logits(model, x, tile=32), whole)


def test_eval_timing_reports_quartiles_and_flags_noise(model):
    x = torch.randn(2, 3, 16, 16)
    small, large = model.pruned(1).eval(), model
    timings = evaluation.time_modes([small, large], x, torch.device("cpu"), rounds=5)
    for t in timings:
        assert t["ms_q1"] <= t["ms_per_image"] <= t["ms_q3"] and t["spread"] >= 0
    steady = [
        {"mode": "L1", "level": 1, "ms_per_image": 1.0, "spread": 0.05},
        {"mode": "L2", "level": 2, "ms_per_image": 2.0, "spread": 0.05},
    ]
    assert evaluation.timing_note(steady) is None
    inverted = [dict(steady[0], ms_per_image=3.0), steady[1]]
    assert "L1 3.00 ms > L2 2.00 ms" in evaluation.timing_note(inverted)
    assert "L2" in evaluation.timing_note([steady[0], dict(steady[1], spread=0.5)])


def test_overlays_are_contrast_stretched():
    dark = np.zeros((20, 20, 3), np.uint8)
    dark[5:10, 5:10] = 30  # a dim nucleus on black, as in fluorescence images
    stretched = stretch_contrast(dark)
    assert stretched.max() == 255 and stretched.min() == 0
    mask = np.zeros((20, 20), bool)
    mask[4:11, 4:11] = True
    out = mask_overlay(dark, mask)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert tuple(out[4, 4]) == (255, 217, 0) and tuple(out[0, 0]) == (0, 0, 0)  # outline, background


def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path):
    (tmp_path / "x.pth").write_text("plain text")
    with pytest.raises(training.CheckpointError, match="not a PyTorch file"):
        training.read_checkpoint(str(tmp_path / "x.pth"))
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    with pytest.raises(training.CheckpointError, match="incomplete.*cut off"):
        training.read_checkpoint(str(tmp_path / "cut.pth"))


def test_an_all_foreground_mask_is_drawn_white(tmp_path):
    from skimage import io

    from unetpp_fast.bench.plots import plot_overlays

    image = np.zeros((1, 32, 32, 3), np.uint8)  # black: one black panel of four
    full = np.ones((1, 32, 32), bool)
    path = plot_overlays(image, full, full, str(tmp_path / "o.png"))
    pixels = io.imread(path)[:, :, :3]
    black = (pixels.max(axis=2) < 30).mean()
    assert black < 0.3, black  # truth and prediction panels are white, not auto-scaled to black
