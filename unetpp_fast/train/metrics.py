"""IoU and Dice of segmentation masks, per image and averaged over the batch.

Binary (one channel) and multi-label (several channels, each thresholded on its own, when
``multiclass=False``): the prediction is ``sigmoid(output) > threshold`` for logits
(``from_logits=True``) or ``output > threshold`` for probabilities; the target is ``target > 0.5``.
Each channel of each image is scored; an image where prediction and target are both empty scores
1 (a correct empty prediction).

Multi-class (``output`` [N, C, H, W] with C > 1, ``multiclass`` None or True): the prediction is
the argmax over channels; the target is a label map [N, H, W] or one-hot/scores [N, C, H, W]
(argmax). Per image, the score is the mean over the classes present in the prediction or the
target.

Results: a 0-d float tensor (batch mean), or per image [N] with ``reduction="none"``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

REDUCTIONS = ("mean", "none")


def _counts(
    output: Tensor, target: Tensor, threshold: float, from_logits: bool, multiclass: bool | None
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(intersection, |prediction|, |target|) per image and class, [N, K] float64; multiclass flag."""
    if not isinstance(output, Tensor) or not isinstance(target, Tensor):
        raise TypeError("output and target must be tensors")
    if output.dim() == 3:
        output = output.unsqueeze(1)  # [N, H, W] binary output
    if output.dim() < 3:
        raise ValueError(f"output must be [N, C, H, W] or [N, H, W], got shape {tuple(output.shape)}")
    channels = output.shape[1]
    is_multiclass = channels > 1 if multiclass is None else bool(multiclass)
    if is_multiclass:
        if channels < 2:
            raise ValueError("multiclass=True needs an output with one channel per class (C >= 2)")
        pred = output.argmax(dim=1)
        if target.shape == output.shape:
            target = target.argmax(dim=1)
        if target.shape != pred.shape:
            raise ValueError(
                f"multi-class target must be a label map {tuple(pred.shape)} or one-hot "
                f"{tuple(output.shape)}, got {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"a multi-class label map must hold integer class indices, got {target.dtype}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= channels):
            raise ValueError(f"class indices in target must lie in 0..{channels - 1}")
        classes = torch.arange(channels, device=output.device).view(1, -1, *([1] * (pred.dim() - 1)))
        pred = pred.unsqueeze(1) == classes
        target = target.unsqueeze(1) == classes
    else:
        if target.dim() == output.dim() - 1 and channels == 1:
            target = target.unsqueeze(1)
        if target.shape != output.shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} must equal output shape {tuple(output.shape)}"
            )
        prob = torch.sigmoid(output) if from_logits else output
        pred = prob > threshold
        target = target > 0.5
    pred = pred.flatten(2).to(torch.float64)
    target = target.flatten(2).to(torch.float64)
    return (pred * target).sum(dim=2), pred.sum(dim=2), target.sum(dim=2), is_multiclass


def _score(
    output: Tensor,
    target: Tensor,
    threshold: float,
    from_logits: bool,
    multiclass: bool | None,
    reduction: str,
    dice: bool,
) -> Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    inter, pred, tgt, is_multiclass = _counts(output, target, threshold, from_logits, multiclass)
    total = pred + tgt
    empty = total == 0
    denominator = total if dice else total - inter
    numerator = 2.0 * inter if dice else inter
    score = numerator / denominator.clamp(min=1.0)
    if is_multiclass:  # classes absent from both are not scored
        present = (~empty).to(score.dtype)
        per_image = (score * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)
    else:  # both empty: a correct empty prediction
        per_image = torch.where(empty, torch.ones_like(score), score).mean(dim=1)
    per_image = per_image.to(torch.float32)
    return per_image.mean() if reduction == "mean" else per_image


def iou_score(
    output: Tensor,
    target: Tensor,
    threshold: float = 0.5,
    from_logits: bool = True,
    multiclass: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Intersection over union |P & T| / |P | T|; see the module docstring for the conventions."""
    return _score(output, target, threshold, from_logits, multiclass, reduction, dice=False)


def dice_score(
    output: Tensor,
    target: Tensor,
    threshold: float = 0.5,
    from_logits: bool = True,
    multiclass: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Dice coefficient 2|P & T| / (|P| + |T|); see the module docstring for the conventions."""
    return _score(output, target, threshold, from_logits, multiclass, reduction, dice=True)
