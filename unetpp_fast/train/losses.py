"""The loss of the UNet++ paper (Eq. 2): binary cross-entropy plus Dice, per image, batch-averaged.

    L = 1/N * sum_b [ bce_weight * BCE(Y_b, P_b) + dice_weight * (1 - Dice(Y_b, P_b)) ]
    Dice(Y, P) = (2 * sum(Y * P) + smooth) / (sum(Y) + sum(P) + smooth),   P = sigmoid(logits)

with BCE the mean binary cross-entropy over the image's pixels (and channels). The paper writes
-(1/N) sum_b (1/2 Y_b log P_b + 2 Y_b P_b / (Y_b + P_b)); the constant 1 (so the loss is >= 0) and
the `smooth` term (so an empty mask and an empty prediction give Dice 1) are those of the
widely used implementations. Under deep supervision (a list of head logits) the loss is the mean
over the heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _check_target(logits: Tensor, target: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be tensors")
    if target.dim() == logits.dim() - 1 and logits.dim() >= 2 and logits.shape[1] == 1:
        target = target.unsqueeze(1)  # [N, H, W] mask for one-channel logits
    if target.shape != logits.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits shape {tuple(logits.shape)} "
            "(or be [N, H, W] for one-channel logits)"
        )
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, C, ...], got shape {tuple(logits.shape)}")
    return target


def bce_dice_per_image(
    logits: Tensor, target: Tensor, bce_weight: float = 0.5, dice_weight: float = 1.0, smooth: float = 1e-5
) -> Tensor:
    """The loss of each image, shape [N] (see the module docstring)."""
    target = _check_target(logits, target)
    # Half precision loses the small Dice terms; compute in at least float32.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    target = target.to(dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(dim=1)
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    dice = (2.0 * (prob * target).sum(dim=1) + smooth) / (prob.sum(dim=1) + target.sum(dim=1) + smooth)
    return bce_weight * bce + dice_weight * (1.0 - dice)


class BCEDiceLoss(nn.Module):
    """Eq. 2 of UNet++: ``bce_weight * BCE + dice_weight * (1 - Dice)`` per image, batch mean.

    forward(logits, target): `logits` [N, C, H, W] or a list of them (deep supervision: the mean
    of the heads' losses); `target` in [0, 1] of the same shape, or [N, H, W] when C == 1.
    """

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 1.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)

    def forward(self, logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        heads = [logits] if isinstance(logits, Tensor) else list(logits)
        if not heads:
            raise ValueError("logits must be a tensor or a non-empty list of head tensors")
        losses = [
            bce_dice_per_image(h, target, self.bce_weight, self.dice_weight, self.smooth).mean()
            for h in heads
        ]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"bce_weight={self.bce_weight}, dice_weight={self.dice_weight}, smooth={self.smooth}"
