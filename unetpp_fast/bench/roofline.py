"""Roofline of each UNet++ convolution: FLOPs, the fewest bytes it must move, and its floor time.

`unetpp_conv_cases(size, batch, filters)` lists every distinct convolution of a UNet++ (encoder
convs reading maxpool2 of the level above, dense skip nodes X[i,j] with their real piece lists,
second convs, the 1x1 heads). For each, `conv_flops` counts multiply-adds x2 and
`conv_min_bytes` the bytes a perfect kernel moves: every stored piece read once (at its stored
size: the resample happens on the fly), the weight and bias read once, the output written once;
backward reads grad_out, the pieces, the weight and the output (the activation mask) and writes
every gradient once. With a GPU's copy bandwidth and matmul rate, both measured in the same run
(`measure_copy_bandwidth`, `measure_matmul_rate`), `floor_time` is the larger of
FLOPs / rate and bytes / bandwidth: no implementation runs much faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unetpp_fast.ops import conv_spec

DEFAULT_FILTERS = (32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Piece:
    channels: int
    height: int  # stored size, before the resample
    width: int
    resample: int  # conv_spec code


@dataclass(frozen=True)
class ConvCase:
    """One distinct convolution of the network: what the fused operator is called with."""

    name: str
    batch: int
    pieces: tuple[Piece, ...]
    out_channels: int
    kernel: int = 3
    activation: str = "relu"
    bias: bool = True
    image_size: int = 0  # the network's input size this conv belongs to (0: not from a network)

    @property
    def in_channels(self) -> int:
        return sum(p.channels for p in self.pieces)

    @property
    def out_hw(self) -> tuple[int, int]:
        first = self.pieces[0]
        return conv_spec.resampled_size(first.height, first.width, first.resample)

    def make_inputs(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        requires_grad: bool = False,
        seed: int = 0,
    ) -> tuple[list[torch.Tensor], list[int], torch.Tensor, torch.Tensor | None]:
        """Random (pieces, resample codes, weight, bias) for this case, He-scaled so values stay O(1)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            t = (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)
            return t.requires_grad_(requires_grad)

        pieces = [
            rand(self.batch, p.channels, p.height, p.width).contiguous(memory_format=fmt).detach()
            for p in self.pieces
        ]
        pieces = [p.requires_grad_(requires_grad) for p in pieces]
        fan_in = self.in_channels * self.kernel * self.kernel
        weight = rand(
            self.out_channels, self.in_channels, self.kernel, self.kernel, scale=(2.0 / fan_in) ** 0.5
        )
        bias = rand(self.out_channels, scale=0.1) if self.bias else None
        return pieces, [p.resample for p in self.pieces], weight, bias


def unetpp_conv_cases(
    size: int,
    batch: int,
    filters: Sequence[int] = DEFAULT_FILTERS,
    in_channels: int = 3,
    num_classes: int = 1,
    upsample: int = conv_spec.UP_BILINEAR_AC,
) -> list[ConvCase]:
    """Every distinct convolution of a UNet++ with deep supervision at input size `size`."""
    depth = len(filters) - 1
    if size % (2**depth):
        raise ValueError(f"size must be a multiple of 2**depth = {2**depth}, got {size}")
    res = [size // 2**i for i in range(depth + 1)]
    cases: list[ConvCase] = []
    for i in range(depth + 1):
        if i == 0:
            source = (Piece(in_channels, size, size, conv_spec.NONE),)
            label = "X0,0.conv1 (input)"
        else:
            source = (Piece(filters[i - 1], res[i - 1], res[i - 1], conv_spec.MAXPOOL2),)
            label = f"X{i},0.conv1 (maxpool)"
        cases.append(ConvCase(label, batch, source, filters[i], image_size=size))
        cases.append(
            ConvCase(
                f"L{i}.conv2 ({res[i]}^2)",
                batch,
                (Piece(filters[i], res[i], res[i], conv_spec.NONE),),
                filters[i],
                image_size=size,
            )
        )
    for i in range(depth):
        for j in range(1, depth - i + 1):
            same_level = tuple(Piece(filters[i], res[i], res[i], conv_spec.NONE) for _ in range(j))
            below = Piece(filters[i + 1], res[i + 1], res[i + 1], upsample)
            cases.append(
                ConvCase(f"X{i},{j}.conv1 ({j}+up)", batch, (*same_level, below), filters[i], image_size=size)
            )
    cases.append(
        ConvCase(
            "head (1x1)",
            batch,
            (Piece(filters[0], size, size, conv_spec.NONE),),
            num_classes,
            kernel=1,
            activation="none",
            image_size=size,
        )
    )
    return cases


def conv_flops(case: ConvCase, backward: bool = False) -> int:
    """2 x multiply-adds of the forward; with `backward`, plus grad-input and grad-weight (2x more)."""
    height, width = case.out_hw
    forward = 2 * case.batch * height * width * case.out_channels * case.in_channels * case.kernel**2
    return forward * 3 if backward else forward


def conv_min_bytes(case: ConvCase, element_size: int, backward: bool = False) -> int:
    """Fewest bytes moved through device memory by forward (and backward when asked)."""
    height, width = case.out_hw
    pieces = sum(case.batch * p.channels * p.height * p.width for p in case.pieces)
    weight = case.out_channels * case.in_channels * case.kernel**2
    bias = case.out_channels if case.bias else 0
    out = case.batch * case.out_channels * height * width
    forward = pieces + weight + bias + out
    if not backward:
        return forward * element_size
    mask = out if case.activation != "none" else 0
    # read grad_out, pieces, weight, mask; write grad pieces, grad weight, grad bias
    backward_elems = out + pieces + weight + mask + pieces + weight + bias
    return (forward + backward_elems) * element_size


def floor_time(flops: int, nbytes: int, copy_bandwidth: float, matmul_rate: float) -> float:
    """Seconds no implementation beats: max(FLOPs / rate, bytes / bandwidth)."""
    return max(flops / matmul_rate, nbytes / copy_bandwidth)


def measure_copy_bandwidth(
    device: torch.device | str = "cuda", nbytes: int = 1 << 30, rounds: int = 10
) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    from unetpp_fast.bench.timing import time_callable

    elements = max(nbytes // 4, 1)
    src = torch.rand(elements, device=device)
    dst = torch.empty_like(src)
    stats = time_callable(lambda: dst.copy_(src), device, warmup=2, rounds=rounds)
    return 2 * elements * 4 / stats.median_s


def measure_matmul_rate(
    device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, n: int = 8192, rounds: int = 10
) -> float:
    """FLOP per second of an n x n x n matrix product on random data in `dtype`."""
    from unetpp_fast.bench.timing import time_callable

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    stats = time_callable(lambda: a @ b, device, warmup=2, rounds=rounds)
    return 2 * n**3 / stats.median_s


def roofline_row(
    case: ConvCase,
    dtype: torch.dtype,
    measured_s: float | None,
    copy_bandwidth: float,
    matmul_rate: float,
    backward: bool = False,
) -> dict[str, float | str | None]:
    """FLOPs, bytes, intensity, floor time, bound, and the fraction of the floor achieved."""
    element_size = torch.empty((), dtype=dtype).element_size()
    flops = conv_flops(case, backward)
    nbytes = conv_min_bytes(case, element_size, backward)
    floor = floor_time(flops, nbytes, copy_bandwidth, matmul_rate)
    return {
        "conv": case.name,
        "gflop": flops / 1e9,
        "min_mb": nbytes / 1e6,
        "flop_per_byte": flops / nbytes,
        "bound": "compute" if flops / matmul_rate >= nbytes / copy_bandwidth else "memory",
        "floor_us": floor * 1e6,
        "measured_us": None if measured_s is None else measured_s * 1e6,
        "fraction_of_floor": None if not measured_s else floor / measured_s,
    }
