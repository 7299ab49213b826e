"""unetpp_fast.compat.BasicUNetPlusPlus against the real MONAI BasicUNetPlusPlus."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unetpp_fast
from unetpp_fast.compat import BasicUNetPlusPlus
from unetpp_fast.ops.testing import relative_error

monai_nets = pytest.importorskip("monai.networks.nets")

SMALL = (8, 8, 16, 16, 32, 8)
TOL = 1e-5


def _pair(seed: int = 0, **kwargs):
    """(MONAI model, ours) built from the same seed, ours loaded from MONAI's state_dict (strict)."""
    torch.manual_seed(seed)
    theirs = monai_nets.BasicUNetPlusPlus(**kwargs)
    torch.manual_seed(seed)
    ours = BasicUNetPlusPlus(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _compare(theirs, ours, x, train: bool, seed: int = 1) -> float:
    theirs.train(train)
    ours.train(train)
    torch.manual_seed(seed)  # the same dropout masks, drawn in the same order
    want = theirs(x)
    torch.manual_seed(seed)
    got = ours(x)
    assert isinstance(got, list) and len(got) == len(want)
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) <= TOL, errors
    return max(errors)


def test_default_2d_same_keys_same_init_same_outputs():
    theirs, ours = _pair(spatial_dims=2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert len(ours.state_dict()) == 148
    torch.manual_seed(0)
    fresh = BasicUNetPlusPlus(spatial_dims=2)
    for (key, a), b in zip(fresh.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), f"{key}: initial values differ from MONAI's under the same seed"
    x = torch.randn(1, 1, 32, 32)
    for train in (True, False):
        _compare(theirs, ours, x, train)


def test_default_3d_constructor_runs_fused_with_same_outputs():
    theirs, ours = _pair()  # MONAI's defaults: 3-D, in 1, out 2, features (32, 32, 64, 128, 256, 32)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # 6,979,844 with one output channel (one head conv of 33 parameters less per output channel).
    assert sum(p.numel() for p in ours.parameters()) == 6_979_844 + 4 * 33
    # Instance norm without running statistics acts alike in train and eval: one mode suffices.
    _compare(theirs, ours, torch.randn(1, 1, 32, 32, 32), train=True)


@pytest.mark.parametrize(
    "upsample, deep_supervision, size",
    [
        ("deconv", False, (32, 32)),
        ("deconv", True, (33, 27)),
        ("nontrainable", True, (32, 32)),
        ("nontrainable", False, (33, 27)),
        ("pixelshuffle", True, (32, 32)),
        ("pixelshuffle", False, (31, 34)),
    ],
)
def test_2d_upsample_modes_deep_supervision_odd_sizes(upsample, deep_supervision, size):
    theirs, ours = _pair(
        spatial_dims=2,
        in_channels=3,
        out_channels=2,
        features=SMALL,
        upsample=upsample,
        deep_supervision=deep_supervision,
    )
    x = torch.randn(2, 3, *size)
    for train in (True, False):
        _compare(theirs, ours, x, train)


@pytest.mark.parametrize(
    "options",
    [
        {"norm": "batch"},  # eval: folded into the conv, LeakyReLU in the epilogue
        {"norm": ("batch", {"affine": False}), "act": "relu", "bias": False},
        {"norm": ("group", {"num_groups": 4}), "act": "prelu"},
        {"norm": None, "act": ("leakyrelu", {"negative_slope": 0.2})},
        {"dropout": 0.3, "deep_supervision": True},
        {"upsample": "deconvgroup"},
    ],
    ids=["batch", "batch-noaffine-relu", "group-prelu", "no-norm", "dropout", "deconvgroup"],
)
def test_2d_norms_activations_dropout(options):
    theirs, ours = _pair(spatial_dims=2, in_channels=2, out_channels=3, features=SMALL, **options)
    x = torch.randn(2, 2, 32, 32)
    rounds = 2 if "batch" in str(options.get("norm")) else 1  # round 2: updated running statistics
    for _ in range(rounds):
        for train in (True, False):
            _compare(theirs, ours, x, train)
    for a, b in zip(theirs.buffers(), ours.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def test_2d_gradients_match_in_float64():
    theirs, ours = _pair(spatial_dims=2, in_channels=1, out_channels=2, features=SMALL, deep_supervision=True)
    theirs.double().train()
    ours.double().train()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    grad_outs = [torch.randn(2, 2, 32, 32, dtype=torch.float64) for _ in range(4)]
    torch.autograd.backward(theirs(x), grad_outs)
    torch.autograd.backward(ours(x), grad_outs)
    named = dict(theirs.named_parameters())
    scale = max(p.grad.abs().max().item() for p in theirs.parameters())
    for name, p in ours.named_parameters():
        # Biases before instance norm get ~1e-14 gradients (the norm removes them): compare absolutely.
        assert torch.allclose(p.grad, named[name].grad, rtol=1e-9, atol=1e-12 * scale), name


def test_2d_runs_every_conv_through_the_operator_without_cat():
    _, ours = _pair(spatial_dims=2, in_channels=1, out_channels=1, features=SMALL, deep_supervision=True)
    ours.eval()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours(torch.randn(1, 1, 32, 32))
    names = [e.name for e in prof.events()]
    # 15 nodes x 2 convs + 4 heads; the cat happens (or not) inside the operator, not in the model.
    assert names.count("unetpp_fast::fused_conv") == 34
    model_level = [e for e in prof.events() if e.name == "aten::cat" and e.cpu_parent is None]
    assert not model_level


def test_from_monai_shares_modules_and_matches():
    torch.manual_seed(0)
    theirs = monai_nets.BasicUNetPlusPlus(spatial_dims=2, features=SMALL, deep_supervision=True)
    wrapped = BasicUNetPlusPlus.from_monai(theirs)
    assert wrapped.upcat_1_2 is theirs.upcat_1_2
    assert list(wrapped.state_dict()) == list(theirs.state_dict())
    ids = {id(p) for p in theirs.parameters()}
    assert all(id(p) in ids for p in wrapped.parameters())
    _compare(theirs, wrapped, torch.randn(1, 1, 32, 32), train=False)


def test_1d_runs_reference_path():
    theirs, ours = _pair(spatial_dims=1, in_channels=2, out_channels=2, features=SMALL)
    _compare(theirs, ours, torch.randn(2, 2, 64), train=True)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="upsample"):
        BasicUNetPlusPlus(spatial_dims=2, upsample="bicubic")
    with pytest.raises(ValueError, match="spatial_dims"):
        BasicUNetPlusPlus(spatial_dims=4)
    with pytest.raises(ValueError, match="norm"):
        BasicUNetPlusPlus(spatial_dims=2, norm="weird")
    model = BasicUNetPlusPlus(spatial_dims=2, features=SMALL)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(TypeError, match="BasicUNetPlusPlus"):
        BasicUNetPlusPlus.from_monai(nn.Conv2d(1, 1, 3))


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_2d_parity_on_cuda(norm, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # MONAI's convs in true fp32
    theirs, ours = _pair(spatial_dims=2, in_channels=2, out_channels=2, features=SMALL, norm=norm)
    theirs.cuda()
    ours.cuda()
    x = torch.randn(2, 2, 64, 64, device="cuda")
    for train in (True, False):
        _compare(theirs, ours, x, train)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_2d_parity_on_each_cpu_backend(backend):
    if backend not in unetpp_fast.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available in this build")
    theirs, ours = _pair(spatial_dims=2, in_channels=1, out_channels=2, features=SMALL, norm="batch")
    x = torch.randn(2, 1, 32, 32)
    with unetpp_fast.use_backend(backend):
        for train in (True, False):
            _compare(theirs, ours, x, train)


# --- 3D: the same fused forward on 5-D pieces (2x2x2 max-pool, trilinear, Conv3d units) ----------

SMALL_3D = (4, 4, 8, 8, 16, 4)


def _fused_calls_and_model_level_cats(model, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    names = [e.name for e in prof.events()]
    model_cats = [e for e in prof.events() if e.name == "aten::cat" and e.cpu_parent is None]
    return names.count("unetpp_fast::fused_conv"), model_cats


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
@pytest.mark.parametrize(
    "options",
    [
        {},  # MONAI's defaults: instance norm (affine), LeakyReLU 0.1, deconv
        {"norm": "batch"},  # eval: folded into the conv, LeakyReLU in the epilogue
        {"upsample": "nontrainable", "deep_supervision": True},  # trilinear read virtually
    ],
    ids=["default", "batch", "nontrainable-ds"],
)
def test_3d_parity_train_and_eval_through_accelerate(options, backend):
    if backend != "auto" and backend not in unetpp_fast.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available in this build")
    torch.manual_seed(0)
    theirs = monai_nets.BasicUNetPlusPlus(
        spatial_dims=3, in_channels=1, out_channels=2, features=SMALL_3D, **options
    )
    fast = unetpp_fast.accelerate(theirs)
    assert isinstance(fast, BasicUNetPlusPlus) and fast.spatial_dims == 3
    torch.manual_seed(0)
    twin = monai_nets.BasicUNetPlusPlus(
        spatial_dims=3, in_channels=1, out_channels=2, features=SMALL_3D, **options
    )
    twin.load_state_dict(theirs.state_dict())  # the plain model to compare with (accelerate shares modules)
    x = torch.randn(2, 1, 32, 32, 32)  # instance norm needs > 1 voxel at level 4
    with unetpp_fast.use_backend(backend):
        rounds = 2 if options.get("norm") == "batch" else 1  # round 2: updated running statistics
        for _ in range(rounds):
            for train in (True, False):
                _compare(twin, fast, x, train)
        fast.eval()
        calls, model_cats = _fused_calls_and_model_level_cats(fast, x)
    heads = 4 if options.get("deep_supervision") else 1
    preconvs = sum(
        1 for name, _ in theirs.named_modules() if name.endswith("preconv")
    )  # 1x1 convs before the trilinear upsample (where channels change)
    assert calls == 15 * 2 + heads + preconvs
    assert not model_cats


def test_3d_gradients_match_monai_in_float64():
    theirs, ours = _pair(
        spatial_dims=3, in_channels=1, out_channels=2, features=SMALL_3D, deep_supervision=True
    )
    theirs.double().train()
    ours.double().train()
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    grad_outs = [torch.randn(2, 2, 32, 32, 32, dtype=torch.float64) for _ in range(4)]
    torch.autograd.backward(theirs(x), grad_outs)
    torch.autograd.backward(ours(x), grad_outs)
    named = dict(theirs.named_parameters())
    scale = max(p.grad.abs().max().item() for p in theirs.parameters())
    for name, p in ours.named_parameters():
        # Biases before instance norm get ~1e-14 gradients (the norm removes them): compare absolutely.
        assert torch.allclose(p.grad, named[name].grad, rtol=1e-9, atol=1e-12 * scale), name


def test_3d_odd_sizes_replicate_pad_like_monai():
    theirs, ours = _pair(spatial_dims=3, in_channels=1, out_channels=2, features=SMALL_3D, norm="batch")
    x = torch.randn(2, 1, 17, 18, 16)
    for train in (True, False):
        _compare(theirs, ours, x, train)


def test_3d_compiles_without_graph_breaks():
    _, ours = _pair(spatial_dims=3, in_channels=1, out_channels=1, features=SMALL_3D)
    ours.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    explanation = torch._dynamo.explain(ours)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
