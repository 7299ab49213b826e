"""Running a trained network on whole images: resized as in the paper, or at native resolution.

    prob = predict_image(model, image, device, resolution="native")   # float [H, W] in [0, 1]

Native resolution: the network is fully convolutional, so an image of any size runs at its own
pixel scale once padded (reflection) to a multiple of 2**depth; an image larger than `tile` on
either side runs as overlapping tiles blended with Gaussian weights, by MONAI's
`sliding_window_inference` when MONAI is installed (`pip install unetpp-fast[predict]`), else as
one padded whole image. Resized: squeezed to the training size (the paper's 96x96) and the
probabilities interpolated back, which merges neighbouring nuclei on large images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unetpp_fast.train import data as data_module

RESOLUTIONS = ("native", "resized")
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 0.25


def size_multiple(model: nn.Module) -> int:
    """Height and width must be multiples of 2**depth (depth = pooling steps of the encoder)."""
    depth = getattr(model, "depth", None)
    if depth is None:
        filters = getattr(model, "filters", None)
        depth = len(filters) - 1 if filters else 4
    return 2 ** int(depth)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad [N, C, H, W] at the bottom and right to multiples of `multiple`; returns (padded, (H, W)).

    Reflection keeps the border's texture (zeros would look like a dark frame to the network);
    replication serves when the image is too small to reflect.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (list, tuple)):  # a model left in training form: average the heads
        out = torch.stack(list(out)).mean(dim=0)
    return out


def monai_available() -> bool:
    try:
        import monai.inferers  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def native_logits(
    model: nn.Module,
    x: torch.Tensor,
    tile: int = DEFAULT_TILE,
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = 4,
) -> torch.Tensor:
    """Logits [N, 1, H, W] of normalised images [N, 3, H, W] at their own resolution.

    tile: images larger than this on a side run as overlapping tiles (0: always the whole image).
    """
    multiple = size_multiple(model)
    h, w = x.shape[-2:]
    if tile and max(h, w) > tile and monai_available():
        from monai.inferers import sliding_window_inference

        roi = max(multiple, tile // multiple * multiple)
        padded, _ = pad_to_multiple(x, multiple)
        out = sliding_window_inference(
            padded, (roi, roi), tile_batch, lambda t: _logits(model, t), overlap=overlap, mode="gaussian"
        )
        return torch.as_tensor(out)[..., :h, :w].float()
    padded, _ = pad_to_multiple(x, multiple)
    return _logits(model, padded)[..., :h, :w].float()


@torch.no_grad()
def resized_logits(model: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """Logits [N, 1, H, W]: the network at size x size, the logits interpolated back to H x W."""
    h, w = x.shape[-2:]
    small = x if (h, w) == (size, size) else F.interpolate(x, (size, size), mode="bilinear", antialias=True)
    out = _logits(model, small).float()
    return out if (h, w) == (size, size) else F.interpolate(out, (h, w), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_image(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    device: torch.device,
    resolution: str = "native",
    size: int = 96,
    tile: int = DEFAULT_TILE,
    overlap: float = DEFAULT_OVERLAP,
    tile_batch: int = 4,
) -> np.ndarray:
    """Foreground probability float32 [H, W] of one uint8 image ([H, W, 3] array or [3, H, W] tensor)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    model.eval()
    x = data_module.normalize(image[None].to(device))
    if resolution == "native":
        logits = native_logits(model, x, tile, overlap, tile_batch)
    else:
        # The paper's resize (scikit-image, anti-aliased), as the training data were made.
        small = data_module.resize_image(image.permute(1, 2, 0).cpu().numpy(), size)
        x_small = data_module.normalize(torch.from_numpy(small).permute(2, 0, 1)[None].to(device))
        logits = F.interpolate(
            _logits(model, x_small).float(), tuple(image.shape[-2:]), mode="bilinear", align_corners=False
        )
    return torch.sigmoid(logits[0, 0]).cpu().numpy().astype(np.float32)


@torch.no_grad()
def native_logits_list(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    device: torch.device,
    tile: int = DEFAULT_TILE,
    on_done: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Logits [1, H, W] (on the CPU) of uint8 images [3, H, W] of any sizes, one at a time.

    on_done: called with 1 after each image (progress bars).
    """
    model.eval()
    out = []
    for image in images:
        out.append(native_logits(model, data_module.normalize(image[None].to(device)), tile)[0].cpu())
        if on_done is not None:
            on_done(1)
    return out


def tiles_needed(height: int, width: int, tile: int, overlap: float = DEFAULT_OVERLAP) -> int:
    """How many windows sliding_window_inference runs on an image (for progress estimates)."""
    if not tile or max(height, width) <= tile:
        return 1
    step = max(1, int(tile * (1 - overlap)))
    return math.ceil(max(height - tile, 0) / step + 1) * math.ceil(max(width - tile, 0) / step + 1)
