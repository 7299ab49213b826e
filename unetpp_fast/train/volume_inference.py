"""Running a trained 3D network on whole volumes: at once when small, else as overlapping windows.

    logits = volume_logits(model, volume, device, window=128)     # volume float [1, D, H, W] -> [1, D, H, W]

The network is fully convolutional: a volume that fits in `window` on every axis runs in one
pass, padded (replicated border) to the multiple of 2**depth the network needs. A larger one runs
as window^3 tiles overlapping by `overlap`, the last tile of each axis flush with the far end,
and the overlapping logits are averaged — a CT scan (512 x 512 x 300) never needs to fit in memory
at once, only `window`^3 voxels of activations.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unetpp_fast.train.inference import _logits as head_logits  # heads averaged in training form
from unetpp_fast.train.inference import size_multiple

DEFAULT_WINDOW = 128
DEFAULT_OVERLAP = 0.25


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return head_logits(model, x).float()


def pad_far_end(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Pad [N, C, D, H, W] at the far end of each axis up to `sizes` (replicating the border)."""
    pads: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(list(sizes))):
        pads += [0, max(want - have, 0)]
    return F.pad(x, pads, mode="replicate") if any(pads) else x


def tile_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start of each window along one axis: stride window * (1 - overlap), the last flush with the end."""
    if size <= window:
        return [0]
    stride = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


def check_window(window: int, multiple: int) -> int:
    if not isinstance(window, int) or window < multiple or window % multiple:
        raise ValueError(f"window must be a positive multiple of {multiple} (2**depth), got {window!r}")
    return window


@torch.no_grad()
def volume_logits(
    model: nn.Module,
    volume: torch.Tensor,
    device: torch.device | str,
    window: int = DEFAULT_WINDOW,
    overlap: float = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """Eval-mode logits float32 [C_out, D, H, W] (on the CPU) of a normalised volume [C_in, D, H, W]."""
    if volume.dim() != 4:
        raise ValueError(f"volume must be [C, D, H, W], got shape {tuple(volume.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    multiple = size_multiple(model)
    check_window(window, multiple)
    model.eval()
    sizes = list(volume.shape[1:])
    x = volume[None].to(device)
    if max(sizes) <= window:
        padded = pad_far_end(x, [-(-s // multiple) * multiple for s in sizes])
        out = _logits(model, padded)
        return out[0, :, : sizes[0], : sizes[1], : sizes[2]].cpu()
    x = pad_far_end(x, [max(s, window) for s in sizes])
    full = x.shape[2:]
    total = torch.zeros((1, 1, *full), dtype=torch.float32, device=device)
    counts = torch.zeros((1, 1, *full), dtype=torch.float32, device=device)
    for d, h, w in itertools.product(*(tile_starts(s, window, overlap) for s in full)):
        tile = x[:, :, d : d + window, h : h + window, w : w + window]
        out = _logits(model, tile)
        if total.shape[1] != out.shape[1]:
            total = total.expand(-1, out.shape[1], -1, -1, -1).clone()
        total[:, :, d : d + window, h : h + window, w : w + window] += out
        counts[:, :, d : d + window, h : h + window, w : w + window] += 1
    return (total / counts)[0, :, : sizes[0], : sizes[1], : sizes[2]].cpu()


def volume_logits_list(
    model: nn.Module,
    volumes: Sequence[torch.Tensor],
    device: torch.device | str,
    window: int = DEFAULT_WINDOW,
    overlap: float = DEFAULT_OVERLAP,
    on_done: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """volume_logits of each volume (volumes of different sizes), calling on_done(1) after each."""
    out = []
    for volume in volumes:
        out.append(volume_logits(model, volume, device, window, overlap))
        if on_done is not None:
            on_done(1)
    return out
