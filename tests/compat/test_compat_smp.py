"""unetpp_fast.compat.UnetPlusPlus against the real segmentation_models_pytorch UnetPlusPlus."""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.compat import UnetPlusPlus
from unetpp_fast.ops.testing import relative_error

smp = pytest.importorskip("segmentation_models_pytorch")

TOL = 1e-5


def _pair(seed: int = 0, **kwargs):
    """(smp model, ours built by our constructor) from the same seed, ours loaded strictly from smp's."""
    kwargs.setdefault("encoder_weights", None)
    torch.manual_seed(seed)
    theirs = smp.UnetPlusPlus(**kwargs)
    torch.manual_seed(seed)
    ours = UnetPlusPlus(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _outputs(model, x, seed):
    torch.manual_seed(seed)  # the classification head's dropout draws the same mask
    out = model(x)
    return list(out) if isinstance(out, tuple) else [out]


def _compare(theirs, ours, x, train: bool, seed: int = 1) -> float:
    theirs.train(train)
    ours.train(train)
    want, got = _outputs(theirs, x, seed), _outputs(ours, x, seed)
    assert len(got) == len(want)
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) <= TOL, errors
    return max(errors)


def test_resnet34_defaults_same_keys_and_outputs():
    theirs, ours = _pair(encoder_name="resnet34")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == 26_078_609
    x = torch.randn(1, 3, 64, 64)
    for train in (True, False):
        _compare(theirs, ours, x, train)


@pytest.mark.parametrize(
    "options",
    [
        {"classes": 3},
        {"decoder_interpolation": "bilinear"},
        {"decoder_interpolation": "bicubic"},
        {"decoder_attention_type": "scse"},
        {"decoder_use_norm": False},
        {"encoder_depth": 3, "decoder_channels": (32, 16, 8), "aux_params": {"classes": 4}},
    ],
    ids=["classes3", "bilinear", "bicubic", "scse", "no-norm", "depth3-aux"],
)
def test_resnet18_variants(options):
    theirs, ours = _pair(encoder_name="resnet18", **options)
    x = torch.randn(2, 3, 64, 64)
    for train in (True, False, True):  # the third pass sees updated BatchNorm running statistics
        _compare(theirs, ours, x, train)
    for a, b in zip(theirs.buffers(), ours.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def test_vgg_encoder_with_center_block():
    torch.manual_seed(0)  # one construction only: the VGG centre block alone has 4.7M parameters
    theirs = smp.UnetPlusPlus(
        encoder_name="vgg11", encoder_weights=None, decoder_channels=(64, 32, 16, 16, 8)
    )
    wrapped = UnetPlusPlus.from_smp(theirs)
    assert any(k.startswith("decoder.center.") for k in wrapped.state_dict())
    assert list(wrapped.state_dict()) == list(theirs.state_dict())
    x = torch.randn(1, 3, 32, 32)
    for train in (True, False):
        _compare(theirs, wrapped, x, train)


def test_gradients_match_in_float64():
    theirs, ours = _pair(encoder_name="resnet18", decoder_channels=(64, 32, 16, 16, 8))
    theirs.double().train()
    ours.double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grad = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    theirs(x).backward(grad)
    ours(x).backward(grad)
    named = dict(theirs.named_parameters())
    scale = max(p.grad.abs().max().item() for p in theirs.parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, named[name].grad, rtol=1e-9, atol=1e-12 * scale), name


def test_from_smp_shares_modules_and_runs_decoder_without_cat_or_upsample():
    torch.manual_seed(0)
    theirs = smp.UnetPlusPlus(
        encoder_name="resnet18", encoder_weights=None, decoder_channels=(64, 32, 16, 16, 8)
    )
    wrapped = UnetPlusPlus.from_smp(theirs)
    assert wrapped.encoder is theirs.encoder and wrapped.decoder.blocks is theirs.decoder.blocks
    assert list(wrapped.state_dict()) == list(theirs.state_dict())
    x = torch.randn(1, 3, 64, 64)
    _compare(theirs, wrapped, x, train=False)
    features = wrapped.encoder(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wrapped.decoder(features)
    top_level = [e.name for e in prof.events() if e.cpu_parent is None]
    assert top_level.count("unetpp_fast::fused_conv") == 2 * len(wrapped.decoder.blocks)
    assert not [n for n in top_level if n == "aten::cat" or n.startswith("aten::upsample")]


def test_input_size_rule_and_errors():
    _, ours = _pair(encoder_name="resnet18", decoder_channels=(64, 32, 16, 16, 8))
    with pytest.raises(RuntimeError, match="divisible by 32"):
        ours(torch.randn(1, 3, 48, 64))
    with pytest.raises(TypeError, match="UnetPlusPlus"):
        UnetPlusPlus.from_smp(torch.nn.Conv2d(1, 1, 1))
    ours.eval()
    with torch.no_grad():
        assert ours.predict(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.cuda
def test_parity_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # smp's convs in true fp32
    theirs, ours = _pair(encoder_name="resnet18")
    theirs.cuda()
    ours.cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    for train in (True, False):
        _compare(theirs, ours, x, train)
