"""MONAI's `BasicUNetPlusPlus`, drop-in: same constructor, defaults, state_dict keys and outputs.

`BasicUNetPlusPlus(spatial_dims=2 or 3, ...)` runs every convolution through `unetpp_fast.fused_conv`:
encoder convs read `maxpool2(X[i-1,0])` virtually, decoder convs read `[X[i,0..j-1], up]`
without a concatenated tensor. How each convolution unit (conv -> norm -> dropout -> act) runs is
described in `unetpp_fast.compat.fused_unit`: instance norm (MONAI's default) cannot be folded, so
the unit is a fused conv followed by the norm and activation modules; batch norm in eval mode is
folded and a (Leaky)ReLU goes into the operator's epilogue.

Upsampling as MONAI does it: 'deconv' (the ConvTranspose output is a plain piece), 'nontrainable'
(1x1 pre-conv where channels change, then bilinear / trilinear x2 with align_corners=True, read
virtually by the next conv when sizes allow), 'pixelshuffle' (sub-pixel conv + shuffle + pad/avg-pool, a plain
piece). Odd sizes: where the upsampled tensor is one short of the skip, it is replicate-padded
exactly as MONAI's `UpCat` does (the virtual read is then replaced by the padded tensor).

In 3D the operator takes 5-D pieces (2x2x2 max-pool, trilinear); which backend runs it is the
operator's choice (today the C++ CPU and the reference backends take 3D; on CUDA tensors the
reference runs until the CUDA/Triton kernels gain 3D). `spatial_dims=1` runs the plain reference
path (PyTorch modules, `torch.cat`); outputs are the same either way.

No dependency on MONAI: the layers are built here with MONAI's names so checkpoints load with
`strict=True`. `BasicUNetPlusPlus.from_monai(model)` wraps an existing MONAI instance, sharing its
modules (and so its parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unetpp_fast.compat.checkpoint import ReadableLoadStateDict
from unetpp_fast.compat.fused_unit import (
    FollowsOriginal,
    replicate_pad_to,
    run_conv_unit,
    unaccounted_children,
)
from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.reference import apply_resample

Tensor = torch.Tensor

UPSAMPLE_MODES = ("deconv", "deconvgroup", "nontrainable", "pixelshuffle")
ENCODER_NAMES = tuple(f"conv_{i}_0" for i in range(5))
DECODER_NAMES = tuple(f"upcat_{i}_{j}" for j in range(1, 5) for i in range(5 - j))
HEAD_NAMES = tuple(f"final_conv_0_{j}" for j in range(1, 5))


# --- layer factories with MONAI's names and defaults -------------------------------------------------


def _split_args(spec, what: str) -> tuple[object, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], dict):
        return spec[0], dict(spec[1])
    raise TypeError(f"{what} must be a name or a (name, {{arguments}}) pair, got {spec!r}")


def _per_dim(classes: tuple[type, type, type], dims: int) -> type:
    return classes[dims - 1]


def _norm_layer(spec, dims: int, channels: int) -> nn.Module:
    if spec == "":
        return nn.Identity()
    name, args = _split_args(spec, "norm")
    if callable(name) and not isinstance(name, str):
        return name(**args)
    key = str(name).lower()
    if key in ("instance", "instance_nvfuser"):
        args.setdefault("num_features", channels)
        return _per_dim((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), dims)(**args)
    if key == "batch":
        args.setdefault("num_features", channels)
        return _per_dim((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), dims)(**args)
    if key == "syncbatch":
        args.setdefault("num_features", channels)
        return nn.SyncBatchNorm(**args)
    if key == "group":
        args.setdefault("num_channels", channels)
        return nn.GroupNorm(**args)
    if key == "layer":
        return nn.LayerNorm(**args)
    if key == "localresponse":
        return nn.LocalResponseNorm(**args)
    raise ValueError(
        f"norm {name!r} is not supported; expected one of 'instance', 'batch', 'group', 'layer', "
        "'localresponse', 'syncbatch', 'instance_nvfuser' (optionally as (name, {arguments}))"
    )


class _Swish(nn.Module):
    """MONAI's Swish: x * sigmoid(alpha * x)."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.alpha * x)


_ACTIVATIONS: dict[str, type] = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "relu6": nn.ReLU6,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softmax": nn.Softmax,
    "logsoftmax": nn.LogSoftmax,
    "swish": _Swish,
    "memswish": _Swish,
    "mish": nn.Mish,
}


def _act_layer(spec) -> nn.Module:
    if spec == "":
        return nn.Identity()
    name, args = _split_args(spec, "act")
    if callable(name) and not isinstance(name, str):
        return name(**args)
    cls = _ACTIVATIONS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"act {name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return cls(**args)


def _dropout_layer(spec) -> nn.Module:
    # Convolution passes dropout_dim=1, so MONAI always builds the element-wise nn.Dropout here.
    if spec == "":
        return nn.Identity()
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return nn.Dropout(p=float(spec))
    name, args = _split_args(spec, "dropout")
    if callable(name) and not isinstance(name, str):
        return name(**args)
    key = str(name).lower()
    if key == "dropout":
        return nn.Dropout(**args)
    if key == "alphadropout":
        return nn.AlphaDropout(**args)
    raise ValueError(f"dropout {name!r} is not supported; expected a ratio, 'dropout' or 'alphadropout'")


class _ADN(nn.Sequential):
    """Norm -> dropout -> activation, each present only when configured (MONAI's ADN, ordering 'NDA')."""

    def __init__(self, dims: int, channels: int, act, norm, dropout):
        super().__init__()
        layers = {
            "N": None if norm is None else _norm_layer(norm, dims, channels),
            "A": None if act is None else _act_layer(act),
            "D": None if dropout is None else _dropout_layer(dropout),
        }
        for name in "NDA":
            if layers[name] is not None:
                self.add_module(name, layers[name])


class _Convolution(nn.Sequential):
    """3x3 conv (padding 1) then ADN: MONAI's `Convolution` as `TwoConv` builds it."""

    def __init__(self, dims: int, in_chns: int, out_chns: int, act, norm, bias: bool, dropout):
        super().__init__()
        conv_cls = _per_dim((nn.Conv1d, nn.Conv2d, nn.Conv3d), dims)
        self.add_module("conv", conv_cls(in_chns, out_chns, kernel_size=3, stride=1, padding=1, bias=bias))
        if act is not None or norm is not None or dropout is not None:
            self.add_module("adn", _ADN(dims, out_chns, act, norm, dropout))


class _TwoConv(nn.Sequential):
    def __init__(self, dims: int, in_chns: int, out_chns: int, act, norm, bias: bool, dropout):
        super().__init__()
        self.add_module("conv_0", _Convolution(dims, in_chns, out_chns, act, norm, bias, dropout))
        self.add_module("conv_1", _Convolution(dims, out_chns, out_chns, act, norm, bias, dropout))


class _Down(nn.Sequential):
    def __init__(self, dims: int, in_chns: int, out_chns: int, act, norm, bias: bool, dropout):
        super().__init__()
        self.add_module(
            "max_pooling", _per_dim((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), dims)(kernel_size=2)
        )
        self.add_module("convs", _TwoConv(dims, in_chns, out_chns, act, norm, bias, dropout))


def _icnr_init_(conv: nn.Module, factor: int) -> None:
    """ICNR initialisation of a sub-pixel conv (Aitken et al. 2017), as MONAI applies it."""
    out_channels, in_channels, *dims = conv.weight.shape
    scale = factor ** len(dims)
    kernel = nn.init.kaiming_normal_(torch.zeros([out_channels // scale, in_channels, *dims]))
    kernel = kernel.transpose(0, 1).reshape(out_channels // scale, in_channels, -1).repeat(1, 1, scale)
    kernel = kernel.reshape([in_channels, out_channels, *dims]).transpose(0, 1)
    with torch.no_grad():
        conv.weight.copy_(kernel)


def _pixel_shuffle(x: Tensor, dims: int, factor: int) -> Tensor:
    """[B, C * f**d, *S] -> [B, C, *(s * f)], channel index (c, f_1 .. f_d) (MONAI's `pixelshuffle`)."""
    batch, channels, *spatial = x.shape
    out_channels = channels // factor**dims
    x = x.reshape([batch, out_channels] + [factor] * dims + spatial)
    order = [0, 1]
    for d in range(dims):
        order += [2 + dims + d, 2 + d]
    return x.permute(order).reshape([batch, out_channels] + [s * factor for s in spatial])


class _SubpixelUpsample(nn.Module):
    def __init__(self, dims: int, in_channels: int, out_channels: int, factor: int = 2):
        super().__init__()
        self.dimensions = dims
        self.scale_factor = factor
        conv_cls = _per_dim((nn.Conv1d, nn.Conv2d, nn.Conv3d), dims)
        self.conv_block = conv_cls(
            in_channels, out_channels * factor**dims, kernel_size=3, stride=1, padding=1
        )
        _icnr_init_(self.conv_block, factor)
        pad_cls = _per_dim((nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d), dims)
        pool_cls = _per_dim((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), dims)
        self.pad_pool = nn.Sequential(
            pad_cls(padding=(factor - 1, 0) * dims, value=0.0), pool_cls(kernel_size=factor, stride=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.pad_pool(_pixel_shuffle(self.conv_block(x), self.dimensions, self.scale_factor))


class _UpSample(nn.Sequential):
    """x2 upsampling with MONAI's child names: 'deconv' | 'deconvgroup' | 'preconv' +
    'upsample_non_trainable' | 'pixelshuffle'."""

    def __init__(self, dims: int, in_chns: int, out_chns: int, mode: str):
        super().__init__()
        if mode in ("deconv", "deconvgroup"):
            groups = (out_chns if in_chns % out_chns == 0 else 1) if mode == "deconvgroup" else 1
            deconv = _per_dim((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), dims)(
                in_chns, out_chns, kernel_size=(2,) * dims, stride=(2,) * dims, padding=0, groups=groups
            )
            self.add_module(mode, deconv)
        elif mode == "nontrainable":
            if out_chns != in_chns:
                conv_cls = _per_dim((nn.Conv1d, nn.Conv2d, nn.Conv3d), dims)
                self.add_module("preconv", conv_cls(in_chns, out_chns, kernel_size=1, bias=True))
            linear = ("linear", "bilinear", "trilinear")[dims - 1]
            self.add_module(
                "upsample_non_trainable",
                nn.Upsample(scale_factor=(2,) * dims, mode=linear, align_corners=True),
            )
        elif mode == "pixelshuffle":
            self.add_module("pixelshuffle", _SubpixelUpsample(dims, in_chns, out_chns))
        else:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")


class _UpCat(nn.Module):
    def __init__(self, dims, in_chns, cat_chns, out_chns, act, norm, bias, dropout, upsample, halves=True):
        super().__init__()
        up_chns = in_chns // 2 if halves else in_chns
        self.upsample = _UpSample(dims, in_chns, up_chns, upsample)
        self.convs = _TwoConv(dims, cat_chns + up_chns, out_chns, act, norm, bias, dropout)
        self.is_pad = True

    def forward(self, x: Tensor, x_e: Tensor | None) -> Tensor:
        return _upcat_plain(self, x, x_e)


# --- forward passes (work on this module's layers and on MONAI's own) ----------------------------------


def _upcat_plain(upcat: nn.Module, x: Tensor, x_e: Tensor | None) -> Tensor:
    """MONAI's UpCat.forward: upsample, replicate-pad to the skip's size, concatenate, two convs."""
    up = upcat.upsample(x)
    if x_e is None:
        return upcat.convs(up)
    if getattr(upcat, "is_pad", True):
        up = replicate_pad_to(up, x_e)
    return upcat.convs(torch.cat([x_e, up], dim=1))


def _convolution_unit(block: nn.Module, pieces: list[Tensor], resample: list[int]) -> Tensor:
    after = list(block.adn.children()) if hasattr(block, "adn") else []
    return run_conv_unit(pieces, resample, block.conv, after)


def _two_conv_fused(two_conv: nn.Module, pieces: list[Tensor], resample: list[int]) -> Tensor:
    hidden = _convolution_unit(two_conv.conv_0, pieces, resample)
    return _convolution_unit(two_conv.conv_1, [hidden], [conv_spec.NONE])


def _is_plain_maxpool2(pool: nn.Module) -> bool:
    """A 2x2 (2x2x2 for MaxPool3d) stride-2 max-pool: the operator's 'maxpool2'."""
    dims = {nn.MaxPool2d: 2, nn.MaxPool3d: 3}.get(type(pool))
    if dims is None:
        return False

    def per_axis(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims

    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (
        per_axis(pool.kernel_size) == (2,) * dims
        and per_axis(stride) == (2,) * dims
        and per_axis(pool.padding) == (0,) * dims
        and per_axis(pool.dilation) == (1,) * dims
        and not pool.ceil_mode
        and not pool.return_indices
    )


def _interp_code(upsample: nn.Module, dims: int = 2) -> int | None:
    """The operator's resample code for an nn.Upsample that doubles every spatial size of a
    `dims`-D input, else None (bilinear in 2D, trilinear in 3D)."""
    if type(upsample) is not nn.Upsample or upsample.size is not None or upsample.recompute_scale_factor:
        return None
    scale = upsample.scale_factor
    scale = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,) * dims
    if tuple(float(s) for s in scale) != (2.0,) * dims:
        return None
    if upsample.mode == "nearest":
        return conv_spec.UP_NEAREST
    if upsample.mode == {2: "bilinear", 3: "trilinear"}.get(dims):
        return conv_spec.UP_BILINEAR_AC if upsample.align_corners else conv_spec.UP_BILINEAR
    return None


def _upsampled_piece(upcat: nn.Module, low: Tensor, skip: Tensor) -> tuple[Tensor, int]:
    """The upsampled input of an UpCat as (piece, resample code): virtual where the sizes allow."""
    children = dict(upcat.upsample.named_children())
    interp = children.get("upsample_non_trainable")
    dims = low.dim() - 2
    code = _interp_code(interp, dims) if interp is not None else None
    if code is not None and set(children) <= {"preconv", "upsample_non_trainable"}:
        if "preconv" in children:
            low = run_conv_unit([low], [conv_spec.NONE], children["preconv"])
        if all(2 * a == b for a, b in zip(low.shape[2:], skip.shape[2:])):
            return low, code
        up = apply_resample(low, code)
    else:
        up = upcat.upsample(low)
    if getattr(upcat, "is_pad", True):
        up = replicate_pad_to(up, skip)
    return up, conv_spec.NONE


def monai_structure_problem(module: nn.Module) -> str:
    """'' when `module` has BasicUNetPlusPlus's submodules, else what is missing."""
    children = dict(module.named_children())
    missing = [n for n in ENCODER_NAMES + DECODER_NAMES + HEAD_NAMES if n not in children]
    if missing:
        return f"submodules {', '.join(missing)}"
    for name in ENCODER_NAMES[1:]:
        if not all(hasattr(children[name], a) for a in ("max_pooling", "convs")):
            return f"{name}.max_pooling / {name}.convs"
    for name in (ENCODER_NAMES[0],) + tuple(f"{n}.convs" for n in ENCODER_NAMES[1:] + DECODER_NAMES):
        two_conv = module.get_submodule(name)
        for unit in ("conv_0", "conv_1"):
            if not isinstance(getattr(getattr(two_conv, unit, None), "conv", None), nn.modules.conv._ConvNd):
                return f"{name}.{unit}.conv (a convolution)"
    for name in DECODER_NAMES:
        if not hasattr(children[name], "upsample"):
            return f"{name}.upsample"
    # Every child must be one the fused forward runs (see `_forward_fused`); extras would be skipped.
    problem = unaccounted_children(module, ENCODER_NAMES + DECODER_NAMES + HEAD_NAMES)
    two_convs = [ENCODER_NAMES[0]] + [f"{n}.convs" for n in ENCODER_NAMES[1:] + DECODER_NAMES]
    for name in ENCODER_NAMES[1:]:
        problem = problem or unaccounted_children(children[name], ("max_pooling", "convs"), f"{name}.")
    for name in DECODER_NAMES:
        problem = problem or unaccounted_children(children[name], ("upsample", "convs"), f"{name}.")
    for name in two_convs:
        two_conv = module.get_submodule(name)
        problem = problem or unaccounted_children(two_conv, ("conv_0", "conv_1"), f"{name}.")
        for unit in ("conv_0", "conv_1"):
            problem = problem or unaccounted_children(
                getattr(two_conv, unit), ("conv", "adn"), f"{name}.{unit}."
            )
    if problem:
        return problem
    # Shapes: each encoder level reads the previous level's channels; heads read level 0's.
    out_channels = [
        module.get_submodule(f"{n}.conv_1.conv" if n == "conv_0_0" else f"{n}.convs.conv_1.conv").out_channels
        for n in ENCODER_NAMES
    ]
    for i in range(1, 5):
        got = module.get_submodule(f"conv_{i}_0.convs.conv_0.conv").in_channels
        if got != out_channels[i - 1]:
            return f"conv_{i}_0 reading {out_channels[i - 1]} channels (its first conv takes {got})"
    for j in range(1, 4):
        head = children[f"final_conv_0_{j}"]
        if getattr(head, "in_channels", None) != out_channels[0]:
            return f"final_conv_0_{j} reading {out_channels[0]} channels"
    return ""


class BasicUNetPlusPlus(FollowsOriginal, ReadableLoadStateDict, nn.Module):
    """MONAI's `BasicUNetPlusPlus` with the same constructor, defaults, keys and outputs.

    Returns a list: the four heads' outputs `[X0_1, X0_2, X0_3, X0_4]` with deep supervision,
    else `[X0_4]`, in train and eval mode alike. 2-D and 3-D run fused (see the module
    docstring); 1-D runs the plain reference path.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        deep_supervision: bool = False,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        bias: bool = True,
        dropout: float | tuple = 0.0,
        upsample: str = "deconv",
    ):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        fea = tuple(features) if isinstance(features, (tuple, list)) else (features,) * 6
        if len(fea) != 6:
            raise ValueError(f"features must be an int or six integers, got {features!r}")
        self.spatial_dims = spatial_dims
        self.deep_supervision = deep_supervision
        d, common = spatial_dims, (act, norm, bias, dropout)

        # Built in MONAI's order, so that the same seed gives the same initial weights.
        self.conv_0_0 = _TwoConv(d, in_channels, fea[0], *common)
        for i in range(1, 5):
            self.add_module(f"conv_{i}_0", _Down(d, fea[i - 1], fea[i], *common))
        for j in range(1, 5):
            for i in range(5 - j):
                out = fea[5] if (i, j) == (0, 4) else fea[i]
                upcat = _UpCat(d, fea[i + 1], fea[i] * j, out, *common, upsample, halves=i > 0)
                self.add_module(f"upcat_{i}_{j}", upcat)
        conv_cls = _per_dim((nn.Conv1d, nn.Conv2d, nn.Conv3d), d)
        for j in range(1, 5):
            self.add_module(f"final_conv_0_{j}", conv_cls(fea[5] if j == 4 else fea[0], out_channels, 1))

    @classmethod
    def from_monai(cls, model: nn.Module) -> BasicUNetPlusPlus:
        """Wrap a `monai.networks.nets.BasicUNetPlusPlus` instance: same modules, fused forward."""
        problem = monai_structure_problem(model)
        if problem:
            raise TypeError(
                f"{type(model).__name__} does not look like MONAI's BasicUNetPlusPlus: no {problem}"
            )
        conv = model.conv_0_0.conv_0.conv
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(type(conv))
        if dims is None:
            raise TypeError(
                f"conv_0_0.conv_0.conv is a {type(conv).__name__}; expected Conv1d, Conv2d or Conv3d"
            )
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.spatial_dims = dims
        wrapper.deep_supervision = bool(getattr(model, "deep_supervision", False))
        for name in ENCODER_NAMES + DECODER_NAMES + HEAD_NAMES:
            wrapper.add_module(name, getattr(model, name))
        wrapper._follow(model)
        wrapper.train(model.training)
        return wrapper

    def forward(self, x: Tensor) -> list[Tensor]:
        self._follow_mode()
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"x must be [batch, channels] + {self.spatial_dims} spatial dims, got shape {tuple(x.shape)}"
            )
        if self.spatial_dims in (2, 3):
            return self._forward_fused(x)
        return self._forward_plain(x)

    def _heads(self, top: list[Tensor], head) -> list[Tensor]:
        if self.deep_supervision:
            return [head(j, top[j]) for j in range(1, 5)]
        return [head(4, top[4])]

    def _forward_plain(self, x: Tensor) -> list[Tensor]:
        """MONAI's forward with PyTorch modules (the path for 1-D)."""
        nodes: dict[tuple[int, int], Tensor] = {(0, 0): self.conv_0_0(x)}
        for k in range(1, 5):  # MONAI's order: X[k,0], then the diagonal X[k-1,1] .. X[0,k]
            nodes[k, 0] = getattr(self, f"conv_{k}_0")(nodes[k - 1, 0])
            for j in range(1, k + 1):
                i = k - j
                skips = [nodes[i, m] for m in range(j)]
                skip = skips[0] if len(skips) == 1 else torch.cat(skips, dim=1)
                nodes[i, j] = _upcat_plain(getattr(self, f"upcat_{i}_{j}"), nodes[i + 1, j - 1], skip)
        return self._heads([nodes[0, j] if j else None for j in range(5)], self._plain_head)

    def _plain_head(self, j: int, x: Tensor) -> Tensor:
        return getattr(self, f"final_conv_0_{j}")(x)

    def _forward_fused(self, x: Tensor) -> list[Tensor]:
        nodes: dict[tuple[int, int], Tensor] = {(0, 0): _two_conv_fused(self.conv_0_0, [x], [conv_spec.NONE])}
        for k in range(1, 5):  # MONAI's order, so that dropout draws its masks in the same sequence
            down = getattr(self, f"conv_{k}_0")
            if _is_plain_maxpool2(down.max_pooling):
                nodes[k, 0] = _two_conv_fused(down.convs, [nodes[k - 1, 0]], [conv_spec.MAXPOOL2])
            else:
                nodes[k, 0] = _two_conv_fused(
                    down.convs, [down.max_pooling(nodes[k - 1, 0])], [conv_spec.NONE]
                )
            for j in range(1, k + 1):
                i = k - j
                upcat = getattr(self, f"upcat_{i}_{j}")
                skips = [nodes[i, m] for m in range(j)]
                piece, code = _upsampled_piece(upcat, nodes[i + 1, j - 1], skips[0])
                nodes[i, j] = _two_conv_fused(upcat.convs, [*skips, piece], [conv_spec.NONE] * j + [code])
        return self._heads([nodes[0, j] if j else None for j in range(5)], self._fused_head)

    def _fused_head(self, j: int, x: Tensor) -> Tensor:
        return run_conv_unit([x], [conv_spec.NONE], getattr(self, f"final_conv_0_{j}"))


BasicUnetPlusPlus = BasicunetPlusPlus = basicunetplusplus = BasicUNetPlusPlus
