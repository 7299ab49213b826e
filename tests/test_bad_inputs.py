"""Every bad input to a public entry point gets a clear Python exception naming what was wrong.

One table of cases: (id, call, exception type, regular expression the message must match).
"""

from __future__ import annotations

import re

import pytest
import torch

import unetpp_fast
from unetpp_fast import fused_conv


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


W3 = _x(4, 3, 3, 3)
W3D = _x(4, 3, 3, 3, 3)

OPERATOR_CASES = [
    ("pieces not a list", lambda: fused_conv("x", W3), ValueError, r"pieces must be a non-empty list"),
    ("pieces empty", lambda: fused_conv([], W3), ValueError, r"pieces must be a non-empty list"),
    ("piece not a tensor", lambda: fused_conv([[1.0]], W3), TypeError, r"pieces\[0\] must be a tensor"),
    ("piece 3-D", lambda: fused_conv([_x(3, 8, 8)], W3), ValueError, r"pieces\[0\] must be 4-D"),
    ("piece 5-D", lambda: fused_conv([_x(1, 3, 2, 8, 8)], W3), ValueError, r"pieces\[0\] must be 4-D"),
    ("weight not a tensor", lambda: fused_conv([_x(1, 3, 8, 8)], "w"), TypeError, r"weight must be a tensor"),
    ("weight 2-D", lambda: fused_conv([_x(1, 3, 8, 8)], _x(4, 3)), ValueError, r"weight must be 4-D"),
    (
        "even kernel",
        lambda: fused_conv([_x(1, 3, 8, 8)], _x(4, 3, 2, 2)),
        ValueError,
        r"square kernel of size 1 or 3",
    ),
    (
        "kernel 5",
        lambda: fused_conv([_x(1, 3, 8, 8)], _x(4, 3, 5, 5)),
        ValueError,
        r"square kernel of size 1 or 3",
    ),
    ("non-square kernel", lambda: fused_conv([_x(1, 3, 8, 8)], _x(4, 3, 3, 1)), ValueError, r"got 3x1"),
    (
        "integer pieces",
        lambda: fused_conv([torch.ones(1, 3, 8, 8, dtype=torch.int64)], W3),
        TypeError,
        r"pieces\[0\] has dtype torch.int64 but weight has torch.float32",
    ),
    (
        "integer weight",
        lambda: fused_conv([_x(1, 3, 8, 8)], torch.ones(4, 3, 3, 3, dtype=torch.int32)),
        TypeError,
        r"weight dtype must be one of float16, bfloat16, float32, float64",
    ),
    (
        "bool weight",
        lambda: fused_conv([_x(1, 3, 8, 8)], torch.ones(4, 3, 3, 3, dtype=torch.bool)),
        TypeError,
        r"weight dtype must be one of",
    ),
    (
        "mixed dtypes",
        lambda: fused_conv([_x(1, 1, 8, 8), _x(1, 2, 8, 8, dtype=torch.float64)], W3),
        TypeError,
        r"pieces\[1\] has dtype torch.float64",
    ),
    (
        "mismatched batch",
        lambda: fused_conv([_x(1, 1, 8, 8), _x(2, 2, 8, 8)], W3),
        ValueError,
        r"pieces\[1\] has batch size 2 but pieces\[0\] has 1",
    ),
    (
        "mismatched device",
        lambda: fused_conv([_x(1, 3, 8, 8).to("meta")], W3),
        ValueError,
        r"pieces\[0\] is on meta but weight is on cpu",
    ),
    (
        "channel sum differs",
        lambda: fused_conv([_x(1, 1, 8, 8), _x(1, 1, 8, 8)], W3),
        ValueError,
        r"2 channels in all \(1 \+ 1\) but weight expects C_in = 3",
    ),
    (
        "sizes disagree without resample",
        lambda: fused_conv([_x(1, 1, 8, 8), _x(1, 2, 4, 4)], W3),
        ValueError,
        r"pieces\[1\] of spatial size \(4, 4\) with resample 'none' becomes \(4, 4\), "
        r"but pieces\[0\] becomes \(8, 8\)",
    ),
    (
        "sizes disagree after upsample",
        lambda: fused_conv([_x(1, 1, 8, 8), _x(1, 2, 5, 4)], W3, resample=["none", "up_bilinear"]),
        ValueError,
        r"pieces\[1\] of spatial size \(5, 4\) with resample 'up_bilinear' becomes \(10, 8\)",
    ),
    (
        "sizes disagree after maxpool",
        lambda: fused_conv([_x(1, 1, 8, 8), _x(1, 2, 8, 8)], W3, resample=["none", "maxpool2"]),
        ValueError,
        r"pieces\[1\] .* 'maxpool2' becomes \(4, 4\)",
    ),
    (
        "maxpool of a 1-pixel piece",
        lambda: fused_conv([_x(1, 3, 1, 1)], W3, resample=["maxpool2"]),
        ValueError,
        r"output spatial size would be \(0, 0\)",
    ),
    (
        "unknown resample name",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, resample=["bicubic"]),
        ValueError,
        r"resample\[0\] must be one of \('none', 'up_nearest'",
    ),
    (
        "resample code out of range",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, resample=[7]),
        ValueError,
        r"resample\[0\] must be one of",
    ),
    (
        "resample given as one string",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, resample="none"),
        ValueError,
        r"resample must be a list with one mode per piece",
    ),
    (
        "resample list too short",
        lambda: fused_conv([_x(1, 1, 8, 8), _x(1, 2, 8, 8)], W3, resample=["none"]),
        ValueError,
        r"resample has 1 entries but there are 2 pieces",
    ),
    (
        "unknown activation",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, activation="swish"),
        ValueError,
        r"activation must be 'none', 'relu', 'leaky_relu'",
    ),
    (
        "leaky slope not a number",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, activation="leaky_relu:abc"),
        ValueError,
        r"activation must be .*got 'leaky_relu:abc'",
    ),
    (
        "leaky slope negative",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, activation="leaky_relu:-1"),
        ValueError,
        r"positive slope",
    ),
    (
        "activation not a string",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, activation=None),
        ValueError,
        r"activation must be a string",
    ),
    (
        "bias wrong length",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, bias=_x(5)),
        ValueError,
        r"bias must be 1-D of length C_out = 4, got shape \(5,\)",
    ),
    (
        "bias 2-D",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, bias=_x(4, 1)),
        ValueError,
        r"bias must be 1-D",
    ),
    (
        "bias wrong dtype",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, bias=_x(4, dtype=torch.float64)),
        TypeError,
        r"bias is torch.float64 on cpu but weight is torch.float32",
    ),
    (
        "bias not a tensor",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, bias=[0.0] * 4),
        TypeError,
        r"bias must be a tensor",
    ),
    (
        "unknown backend",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, backend="fast"),
        ValueError,
        r"backend must be one of \('auto', 'reference', 'triton', 'cuda', 'cpu'\)",
    ),
    (
        "cuda backend for cpu tensors",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, backend="cuda"),
        RuntimeError,
        r"backend 'cuda' was requested for cpu tensors but",
    ),
    (
        "leaky slope with a trailing space",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, activation="leaky_relu:0.1 "),
        ValueError,
        r"ASCII decimal literal.*got 'leaky_relu:0.1 '",
    ),
    (
        "leaky slope with an underscore",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, activation="leaky_relu:1_0"),
        ValueError,
        r"activation must be",
    ),
    (
        "leaky slope in Arabic-Indic digits",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, activation="leaky_relu:\u0661"),
        ValueError,
        r"activation must be",
    ),
    (
        "leaky slope infinite",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3, activation="leaky_relu:1e999"),
        ValueError,
        r"positive slope",
    ),
    (
        "triton given float64",
        lambda: fused_conv([_x(1, 3, 8, 8, dtype=torch.float64)], W3.double(), backend="triton"),
        TypeError,
        r"'triton' supports the dtypes float16, bfloat16, float32, got torch.float64",
    ),
    (
        "cpu given 9 pieces",
        lambda: fused_conv([_x(1, 1, 4, 4) for _ in range(9)], _x(2, 9, 3, 3), backend="cpu"),
        ValueError,
        r"'cpu' takes at most 8 pieces, got 9",
    ),
    (
        "3D: 5-D piece with a 4-D weight",
        lambda: fused_conv([_x(1, 3, 2, 8, 8)], W3),
        ValueError,
        r"pieces\[0\] must be 4-D \[N, C, H, W\] to match the 4-D weight",
    ),
    (
        "3D: 4-D piece with a 5-D weight",
        lambda: fused_conv([_x(1, 3, 8, 8)], W3D),
        ValueError,
        r"pieces\[0\] must be 5-D \[N, C, D, H, W\] to match the 5-D weight",
    ),
    (
        "3D: mixed 4-D and 5-D pieces",
        lambda: fused_conv([_x(1, 1, 2, 8, 8), _x(1, 2, 8, 8)], W3D),
        ValueError,
        r"pieces\[1\] is 4-D but pieces\[0\] is 5-D",
    ),
    ("3D: weight 6-D", lambda: fused_conv([_x(1, 3, 2, 8, 8)], _x(4, 3, 3, 3, 3, 3)), ValueError, r"or 5-D"),
    (
        "3D: non-cubic kernel",
        lambda: fused_conv([_x(1, 3, 2, 8, 8)], _x(4, 3, 3, 3, 1)),
        ValueError,
        r"cubic kernel of size 1 or 3, got 3x3x1",
    ),
    (
        "3D: sizes disagree after trilinear upsample",
        lambda: fused_conv([_x(1, 1, 2, 8, 8), _x(1, 2, 1, 4, 3)], W3D, resample=["none", "up_trilinear"]),
        ValueError,
        r"pieces\[1\] of spatial size \(1, 4, 3\) with resample 'up_trilinear' becomes \(2, 8, 6\), "
        r"but pieces\[0\] becomes \(2, 8, 8\)",
    ),
    (
        "3D: maxpool of a 1-voxel-deep piece",
        lambda: fused_conv([_x(1, 3, 1, 8, 8)], W3D, resample=["maxpool2"]),
        ValueError,
        r"output spatial size would be \(0, 4, 4\)",
    ),
    (
        "3D: a bilinear name for 5-D pieces",
        lambda: fused_conv([_x(1, 3, 1, 4, 4)], W3D, resample=["up_bilinear"]),
        ValueError,
        r"resample\[0\] is 'up_bilinear', a mode of 4-D pieces, but the pieces are 5-D: use one of "
        r"\('none', 'up_nearest', 'up_trilinear'",
    ),
    (
        "2D: a trilinear name for 4-D pieces",
        lambda: fused_conv([_x(1, 3, 4, 4)], W3, resample=["up_trilinear"]),
        ValueError,
        r"resample\[0\] is 'up_trilinear', a mode of 5-D pieces, but the pieces are 4-D",
    ),
    (
        "set_backend with an unknown name",
        lambda: unetpp_fast.ops.backends.set_backend("fastest"),
        ValueError,
        r"backend must be one of",
    ),
    (
        "raw op with bad resample code",
        lambda: torch.ops.unetpp_fast.fused_conv([_x(1, 3, 8, 8)], [9], W3, None, "relu"),
        ValueError,
        r"resample\[0\] must be one of",
    ),
    (
        "raw op with mismatched channels",
        lambda: torch.ops.unetpp_fast.fused_conv([_x(1, 2, 8, 8)], [0], W3, None, "relu"),
        ValueError,
        r"weight expects C_in = 3",
    ),
]


@pytest.mark.parametrize(
    "call, error, message", [c[1:] for c in OPERATOR_CASES], ids=[c[0] for c in OPERATOR_CASES]
)
def test_operator_rejects_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_forced_2d_only_backend_refuses_a_3d_call():
    # Every CPU backend takes 3D now: register 'reference' again declaring 2D only, then restore.
    backends = unetpp_fast.ops.backends
    saved = backends.registered("reference")
    try:
        backends.register_backend("reference", saved[0], saved[1], backends.Capabilities(spatial_dims=(2,)))
        with pytest.raises(
            ValueError,
            match=r"backend 'reference' takes 2D \(4-D pieces\) only, got a 3D call \(5-D pieces\)",
        ):
            fused_conv([_x(1, 3, 2, 8, 8)], W3D, backend="reference")
    finally:
        backends.register_backend("reference", *saved)
    assert fused_conv([_x(1, 3, 2, 8, 8)], W3D, backend="reference").shape == (1, 4, 2, 8, 8)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = unetpp_fast.ops.backends.why_unusable("triton", "cpu")
    if not reason:
        pytest.skip("Triton kernels were already loaded under the interpreter in this process")
    assert "TRITON_INTERPRET" in reason


def test_nan_and_inf_propagate_like_the_reference():
    x = _x(1, 3, 6, 6)
    x[0, 0, 2, 2] = float("nan")
    x[0, 1, 4, 4] = float("inf")
    out = fused_conv([x], W3, activation="none")
    ref = fused_conv([x], W3, activation="none", backend="reference")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


def _tiny_unetpp(**kw):
    from unetpp_fast import UNetPlusPlus

    return UNetPlusPlus(3, 1, filters=(2, 4, 8, 16, 32), **kw)


def _mismatched_state_dict():
    model = _tiny_unetpp()
    state = model.state_dict()
    state.pop("final1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["conv0_0.conv1.weight"] = torch.zeros(1)
    return model, state


def _load_mismatched():
    model, state = _mismatched_state_dict()
    unetpp_fast.load_checkpoint(model, state)


MODEL_CASES = [
    (
        "model: wrong channels",
        lambda: _tiny_unetpp()(_x(1, 1, 16, 16)),
        ValueError,
        r"input has 1 channels but the model expects in_channels=3",
    ),
    (
        "model: size not a multiple",
        lambda: _tiny_unetpp()(_x(1, 3, 30, 32)),
        ValueError,
        r"multiples of 16 .* got 30x32; pass pad_to_multiple=True",
    ),
    ("model: 3-D input", lambda: _tiny_unetpp()(_x(3, 16, 16)), ValueError, r"input must be a 4-D tensor"),
    (
        "model: integer input",
        lambda: _tiny_unetpp()(torch.ones(1, 3, 16, 16, dtype=torch.int64)),
        TypeError,
        r"input must be a floating-point tensor, got dtype torch.int64",
    ),
    (
        "model: dtype differs from parameters",
        lambda: _tiny_unetpp()(_x(1, 3, 16, 16, dtype=torch.float64)),
        TypeError,
        r"input has dtype torch.float64 but the model's parameters are torch.float32",
    ),
    (
        "model: one filter",
        lambda: unetpp_fast.UNetPlusPlus(3, 1, filters=(4,)),
        ValueError,
        r"filters must have 3 to 6 entries",
    ),
    ("model: unknown block", lambda: _tiny_unetpp(block="conv"), ValueError, r"block must be one of"),
    (
        "model: unknown upsample",
        lambda: _tiny_unetpp(upsample="bicubic"),
        ValueError,
        r"upsample must be one of",
    ),
    (
        "model: zero in_channels",
        lambda: unetpp_fast.UNetPlusPlus(0, 1),
        ValueError,
        r"in_channels must be a positive int",
    ),
    ("model: unknown mode", lambda: _tiny_unetpp(mode="slow"), ValueError, r"mode must be one of"),
    (
        "model: prune beyond depth",
        lambda: _tiny_unetpp(mode="fast", prune=7),
        ValueError,
        r"prune must be an int in 1..4",
    ),
    (
        "model: pruned() without deep supervision",
        lambda: _tiny_unetpp(deep_supervision=False).pruned(2),
        ValueError,
        r"pruned\(\) needs deep_supervision=True",
    ),
    (
        "model: pruned() beyond depth",
        lambda: _tiny_unetpp().pruned(9),
        ValueError,
        r"level must be an int in 1..4",
    ),
    (
        "checkpoint: missing, unexpected, mis-shaped keys",
        _load_mismatched,
        Exception,
        r"(?s)missing keys.*final1.weight.*unexpected keys.*extra.weight.*conv0_0.conv1.weight",
    ),
    (
        "checkpoint: no such file",
        lambda: unetpp_fast.load_checkpoint(_tiny_unetpp(), "/nonexistent/ckpt.pt"),
        FileNotFoundError,
        r"nonexistent",
    ),
    (
        "accelerate: unrecognised model",
        lambda: unetpp_fast.accelerate(torch.nn.Linear(2, 2)),
        TypeError,
        r"does not recognise Linear as a supported UNet\+\+",
    ),
    (
        "accelerate: not a module",
        lambda: unetpp_fast.accelerate("model"),
        TypeError,
        r"accelerate\(\) expects an nn.Module, got str",
    ),
    (
        "accelerate: extra dropout child",
        lambda: unetpp_fast.accelerate(_nested_unet_with(drop=torch.nn.Dropout2d(0.5))),
        TypeError,
        r"unaccounted child module\(s\) drop \(Dropout2d\)",
    ),
    (
        "accelerate: activation under another name",
        lambda: unetpp_fast.accelerate(_nested_unet_with(block_child=("act", torch.nn.LeakyReLU(0.2)))),
        TypeError,
        r"conv1_1\.act \(LeakyReLU\)",
    ),
    (
        "load_checkpoint: empty file",
        lambda: unetpp_fast.load_checkpoint(_nested_unet(), _written_file(b"")),
        ValueError,
        r"empty\.pth \(0 bytes\) is not a readable checkpoint",
    ),
    (
        "load_checkpoint: truncated file",
        lambda: unetpp_fast.load_checkpoint(_nested_unet(), _written_file(_saved_bytes()[:100])),
        ValueError,
        r"\(100 bytes\) is not a readable checkpoint",
    ),
    ("compat: NestedUNet size", lambda: _nested_unet()(_x(1, 3, 30, 30)), ValueError, r"multiples of 16"),
    (
        "compat: MONAI spatial_dims",
        lambda: _monai(spatial_dims=4),
        ValueError,
        r"spatial_dims must be 1, 2 or 3",
    ),
    (
        "compat: MONAI features",
        lambda: _monai(spatial_dims=2, features=(1, 2)),
        ValueError,
        r"features must be an int or six integers",
    ),
]


def _nested_unet():
    from unetpp_fast.compat import NestedUNet

    return NestedUNet(1)


def _nested_unet_with(drop: torch.nn.Module | None = None, block_child: tuple | None = None):
    """pytorch-nested-unet's NestedUNet structure (plain modules), with one extra child."""
    from unetpp_fast.compat import NestedUNet

    fused = NestedUNet(1)
    original = torch.nn.Module()
    for name, child in fused.named_children():
        original.add_module(name, child)
    original.add_module("pool", torch.nn.MaxPool2d(2, 2))
    original.add_module("up", torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
    if drop is not None:
        original.add_module("drop", drop)
    if block_child is not None:
        original.conv1_1.add_module(*block_child)
    return original


def _written_file(data: bytes) -> str:
    import tempfile

    folder = tempfile.mkdtemp(prefix="unetpp_bad_inputs_")
    path = f"{folder}/{'empty' if not data else 'cut'}.pth"
    with open(path, "wb") as f:
        f.write(data)
    return path


def _saved_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(_nested_unet().state_dict(), buffer)
    return buffer.getvalue()


def _monai(**kw):
    from unetpp_fast.compat import BasicUNetPlusPlus

    return BasicUNetPlusPlus(**kw)


@pytest.mark.parametrize(
    "call, error, message", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES]
)
def test_models_and_loaders_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _cli_case(tmp_path, case: str) -> list[str]:
    """Lay out the files one CLI case needs; return its arguments."""
    from unetpp_fast.train.synthetic_data import write_synthetic_dataset

    data = tmp_path / "ds"
    if case == "missing folder":
        return ["train", "--data", str(tmp_path / "missing")]
    if case == "empty folder":
        data.mkdir()
        return ["train", "--data", str(data)]
    if case == "empty images folder":
        (data / "images").mkdir(parents=True)
        (data / "masks").mkdir()
        return ["train", "--data", str(data)]
    write_synthetic_dataset(str(data), n=4, size=32)
    if case == "corrupt image":
        (data / "images" / "sample002.png").write_bytes(b"\x89PNG broken")
    elif case == "image without mask":
        (data / "masks" / "sample001.png").unlink()
    elif case == "mask of another size":
        from skimage import io

        io.imsave(
            str(data / "masks" / "sample000.png"),
            torch.zeros(8, 8, dtype=torch.uint8).numpy(),
            check_contrast=False,
        )
    elif case == "not a checkpoint":
        torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pth")
        return ["eval", str(tmp_path / "plain.pth")]
    return ["train", "--data", str(data), "--size", "32", "--epochs", "1", "--no-progress"]


CLI_CASES = [
    ("missing folder", r"does not exist"),
    ("empty folder", r"has neither images/ and masks/ \(merged layout\) nor"),
    ("empty images folder", r"(?i)no .*image|empty"),
    ("corrupt image", r"sample002.png"),
    ("image without mask", r"has no mask"),
    ("mask of another size", r"sample000.png' is 8x8 but its image is 32x32"),
    ("not a checkpoint", r"not an unetpp-fast training checkpoint"),
]


@pytest.mark.parametrize("case, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_rejects_bad_data_with_one_line(case, message, tmp_path, capsys):
    from unetpp_fast import cli

    assert cli.main(_cli_case(tmp_path, case)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
