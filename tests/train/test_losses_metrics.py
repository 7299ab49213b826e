"""BCE + Dice loss (Eq. 2) and IoU / Dice metrics against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unetpp_fast.train.losses import BCEDiceLoss
from unetpp_fast.train.metrics import dice_score, iou_score

LN3 = math.log(3.0)


def image_one():
    """Probabilities 0.5, 0.75 / 0.25, 0.5 against a mask whose top row is set."""
    logits = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    return logits, target


def test_bce_dice_hand_computed_one_image():
    logits, target = image_one()
    # BCE per pixel: ln 2, ln 4/3, ln 4/3, ln 2 -> mean ln(8/3)/2. Dice: 2 * 1.25 / (2 + 2) = 0.625.
    expected = 0.5 * math.log(8 / 3) / 2 + (1 - 0.625)
    loss = BCEDiceLoss(smooth=0.0)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(expected, abs=1e-5)
    # [N, H, W] target for one-channel logits.
    assert BCEDiceLoss(smooth=0.0)(logits, target[:, 0]).item() == pytest.approx(expected, rel=1e-12)


def test_bce_dice_is_per_image_and_batch_averaged():
    logits, target = image_one()
    logits = torch.cat([logits, torch.zeros_like(logits)])  # image 2: p = 0.5 everywhere, empty mask
    target = torch.cat([target, torch.zeros_like(target)])
    smooth = 1e-5
    first = 0.5 * math.log(8 / 3) / 2 + 1 - (2.5 + smooth) / (4 + smooth)
    second = 0.5 * math.log(2.0) + 1 - smooth / (2 + smooth)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx((first + second) / 2, rel=1e-12)
    # A confident empty prediction of an empty mask costs (almost) nothing thanks to `smooth`.
    empty = BCEDiceLoss()(torch.full((1, 1, 2, 2), -40.0), torch.zeros(1, 1, 2, 2))
    assert empty.item() == pytest.approx(0.0, abs=1e-6)


def test_bce_dice_averages_heads_and_weights():
    torch.manual_seed(0)
    heads = [torch.randn(2, 2, 3, 3, dtype=torch.float64) for _ in range(3)]
    target = (torch.rand(2, 2, 3, 3) > 0.5).double()
    loss = BCEDiceLoss(bce_weight=0.3, dice_weight=2.0)
    assert loss(heads, target).item() == pytest.approx(
        sum(loss(h, target).item() for h in heads) / 3, rel=1e-12
    )
    bce = F.binary_cross_entropy_with_logits(heads[0], target).item()
    dice_only = BCEDiceLoss(bce_weight=0.0)(heads[0], target).item()
    assert BCEDiceLoss(bce_weight=1.0, dice_weight=0.0)(heads[0], target).item() == pytest.approx(
        bce, rel=1e-12
    )
    assert loss(heads[0], target).item() == pytest.approx(0.3 * bce + 2.0 * dice_only, rel=1e-12)
    leaf = heads[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: loss(t, target), (leaf,))
    with pytest.raises(ValueError, match="target shape"):
        loss(heads[0], target[:, :1])
    with pytest.raises(ValueError, match="non-empty"):
        loss([], target)


def test_binary_iou_and_dice_hand_computed():
    # Image 1: prediction {(0,0), (1,0)} vs mask {(0,0), (0,1)}: IoU 1/3, Dice 1/2.
    # Image 2: empty prediction, empty mask: 1 for both.
    logits = torch.tensor([[[[2.0, -1.0], [3.0, -2.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert iou_score(logits, target).item() == pytest.approx((1 / 3 + 1) / 2)
    assert dice_score(logits, target).item() == pytest.approx((1 / 2 + 1) / 2)
    assert iou_score(logits, target, reduction="none").tolist() == pytest.approx([1 / 3, 1.0])
    assert dice_score(logits[:, 0], target[:, 0]).item() == pytest.approx(0.75)  # [N, H, W] inputs
    probs = torch.tensor([[[[0.6, 0.4], [0.7, 0.2]]]])
    assert iou_score(probs, target[:1], from_logits=False).item() == pytest.approx(1 / 3)
    # Threshold 0.65 keeps only (1,0), which misses the mask entirely.
    assert iou_score(probs, target[:1], threshold=0.65, from_logits=False).item() == 0.0
    assert dice_score(probs, target[:1], threshold=0.65, from_logits=False).item() == 0.0


def test_multilabel_scores_each_channel():
    logits = torch.tensor([[[[2.0, -1.0], [3.0, -2.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    # Channel 0: IoU 1/3, Dice 1/2; channel 1: all predicted, half set: IoU 1/2, Dice 2/3.
    assert iou_score(logits, target, multiclass=False).item() == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert dice_score(logits, target, multiclass=False).item() == pytest.approx((1 / 2 + 2 / 3) / 2)


def one_hot_logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return 5.0 * F.one_hot(labels, classes).permute(0, 3, 1, 2).float() + 0.1 * torch.rand(
        labels.shape[0], classes, *labels.shape[1:]
    )


def test_multiclass_iou_and_dice_hand_computed():
    pred = torch.tensor([[[0, 1], [2, 2]], [[0, 1], [1, 1]]])
    target = torch.tensor([[[0, 1], [1, 2]], [[0, 1], [1, 0]]])
    logits = one_hot_logits(pred, 3)
    # Image 1: class IoUs 1, 1/2, 1/2; Dices 1, 2/3, 2/3.
    # Image 2 (class 2 absent from both, not scored): IoUs 1/2, 2/3; Dices 2/3, 4/5.
    iou = iou_score(logits, target, reduction="none")
    dice = dice_score(logits, target, reduction="none")
    assert iou.tolist() == pytest.approx([2 / 3, 7 / 12])
    assert dice.tolist() == pytest.approx([7 / 9, 11 / 15])
    assert iou_score(logits, target).item() == pytest.approx((2 / 3 + 7 / 12) / 2)
    one_hot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert dice_score(logits, one_hot).item() == pytest.approx((7 / 9 + 11 / 15) / 2)
    assert iou_score(logits.softmax(1), target, from_logits=False).item() == pytest.approx(iou.mean().item())


def test_metric_input_errors():
    logits = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="integer class indices"):
        iou_score(logits, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="0..2"):
        iou_score(logits, torch.full((2, 4, 4), 3))
    with pytest.raises(ValueError, match="target shape"):
        iou_score(logits[:, :1], torch.rand(2, 1, 4, 5))
    with pytest.raises(ValueError, match="reduction"):
        dice_score(logits[:, :1], torch.rand(2, 1, 4, 4), reduction="sum")
    with pytest.raises(ValueError, match="C >= 2"):
        dice_score(logits[:, :1], torch.zeros(2, 4, 4, dtype=torch.long), multiclass=True)


def test_timing_quartiles_stay_within_the_measured_times(monkeypatch):
    # two rounds, one slow: the 'exclusive' quantile method would extrapolate below the fastest run
    import torch.nn as nn

    from unetpp_fast.bench.timing import TimingStats
    from unetpp_fast.train import evaluation

    durations = iter([1.0, 9.0] * 4)

    def fake_timing(fn, device, warmup, rounds):
        s = next(durations)
        return TimingStats(s, s, s, s, 0.0, 1, "cpu")

    monkeypatch.setattr(evaluation, "time_callable", fake_timing)
    rows = evaluation.time_modes([nn.Identity()], torch.randn(1, 3), torch.device("cpu"), rounds=2)
    assert rows[0]["ms_per_image"] == 5000.0
    assert 1000.0 <= rows[0]["ms_q1"] <= rows[0]["ms_q3"] <= 9000.0
