"""Block configurations per kernel and shape class.

Two shape classes, after UNet++'s nodes: the level-0 nodes (C_out = 32 at full resolution) move
far more bytes than they multiply and want tall pixel tiles with narrow channel tiles
(`memory_bound`); the deep nodes (C_out >= 64 on small images) are compute-bound and want square
tiles and more pipelining (`compute_bound`). On a GPU each class is autotuned over its list;
the interpreter runs one small config. Lists are per compute capability (Hopper has its own where
it differs); `aot.py` compiles every list for the arch it serves (sm_80, sm_90) and checks for spills.
"""

from __future__ import annotations

from triton import Config

SHAPE_CLASSES = ("memory_bound", "compute_bound")

# Kernel name -> the block-size constexprs it takes.
BLOCK_PARAMS = {
    "forward": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "forward_scalar": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),  # the forward with VEC = 1
    # The packed forward (fused_conv_forward_packed.py): BLOCK_K follows taps x C_in (the launcher).
    "forward_packed": ("BLOCK_H", "BLOCK_W", "BLOCK_N"),  # a CTA: BLOCK_H x BLOCK_W pixels of one plane
    # The staged forward (fused_conv_forward_staged.py): BLOCK_H x BLOCK_W pixel blocks, SUB halo
    # pixels staged per trip.
    "forward_staged": ("BLOCK_H", "BLOCK_W", "BLOCK_N", "SUB"),
    "forward_staged_1x1": ("BLOCK_H", "BLOCK_W", "BLOCK_N", "SUB"),  # its k = 1 instance (the heads)
    "preactivation_grad": ("BLOCK_M", "BLOCK_C"),
    "input_grad": ("BLOCK_M", "BLOCK_C", "BLOCK_CO"),
    "input_grad_maxpool": ("BLOCK_M", "BLOCK_C", "BLOCK_CO"),
    "input_grad_up": ("BLOCK_HR", "BLOCK_C", "BLOCK_CO"),
    "weight_grad": ("BLOCK_CO", "BLOCK_C", "BLOCK_P"),
}

# 3D (DIMS = 3) runs the same kernels under their own config lists: eight corners, a 2x2x2 window
# and 27 taps hold more registers, so some tiles that fit in 2D spill in 3D (aot.py).
BLOCK_PARAMS.update({f"{name}_3d": params for name, params in BLOCK_PARAMS.items()})


def config_name(kernel: str, dims: int) -> str:
    """The config list (and tuning) name of `kernel` for 2D or 3D calls."""
    return kernel if dims == 2 else f"{kernel}_3d"


# The pixel chunk each weight-gradient split covers is a multiple of the largest BLOCK_P below.
WEIGHT_GRAD_MAX_BLOCK_P = 128


def shape_class(c_in: int, c_out: int) -> str:
    """'memory_bound' for thin convolutions (UNet++ level 0), else 'compute_bound'."""
    return "memory_bound" if c_out <= 32 or c_in <= 32 else "compute_bound"


def _cfg(warps: int, stages: int, **blocks: int) -> Config:
    return Config(dict(blocks), num_warps=warps, num_stages=stages)


_GPU = {
    "forward": {
        # bf16 on sm_80 and sm_90 without spills (aot.py), k = 1 and 3. One pipelined channel loop
        # per read class (fused_conv_forward.py). Level 0 (C_out 32, 32-channel pieces) wants K 32:
        # a wider K block would multiply padding. Two stages, not three: the prologue and drain
        # around a blend piece's channel loop (per tap) grow with the stages. Hopper has its own
        # lists (_GPU_HOPPER).
        "memory_bound": [
            _cfg(8, 2, BLOCK_M=128, BLOCK_N=32, BLOCK_K=32),
            _cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
        ],
        "compute_bound": [
            _cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
            _cfg(8, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
            # Deep levels of small images (a few dozen CTAs): smaller tiles, more of them.
            _cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
        ],
    },
    # VEC = 1 (the 3-channel input convolution, misaligned views): element-wise loads and pointers
    # hold far more registers; wider tiles spill.
    "forward_scalar": {
        "memory_bound": [_cfg(8, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=16)],
        "compute_bound": [_cfg(8, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=16)],
    },
    # The packed forward (few input channels, one K block of every (tap, channel) pair): one config,
    # so the input convolution compiles one kernel.
    "forward_packed": {
        "memory_bound": [_cfg(8, 1, BLOCK_H=16, BLOCK_W=16, BLOCK_N=32)],
        "compute_bound": [_cfg(8, 1, BLOCK_H=16, BLOCK_W=16, BLOCK_N=32)],
    },
    # The staged forward (fused_conv_forward_staged.py): one config per class on sm_80, where
    # mma.sync holds A and B fragments in registers too (16x16 N32: 182 registers, no spills).
    # Hopper has its own lists (_GPU_HOPPER).
    "forward_staged": {
        "memory_bound": [_cfg(8, 3, BLOCK_H=16, BLOCK_W=16, BLOCK_N=32, SUB=128)],
        "compute_bound": [_cfg(8, 3, BLOCK_H=16, BLOCK_W=16, BLOCK_N=32, SUB=128)],
    },
    "forward_staged_1x1": {
        "memory_bound": [_cfg(8, 3, BLOCK_H=16, BLOCK_W=16, BLOCK_N=32, SUB=128)],
        "compute_bound": [_cfg(8, 3, BLOCK_H=16, BLOCK_W=16, BLOCK_N=32, SUB=128)],
    },
    "preactivation_grad": {
        "memory_bound": [_cfg(4, 1, BLOCK_M=128, BLOCK_C=32)],
        "compute_bound": [_cfg(4, 1, BLOCK_M=64, BLOCK_C=64)],
    },
    # Backward kernels: one config per class where tuning would add compilations to a train step
    # (budget: 24); all of these compile without spills on sm_80 and sm_90 (aot.py).
    "input_grad": {
        "memory_bound": [_cfg(8, 3, BLOCK_M=128, BLOCK_C=32, BLOCK_CO=16)],
        "compute_bound": [_cfg(8, 3, BLOCK_M=128, BLOCK_C=32, BLOCK_CO=16)],  # C64 spills on sm_80
    },
    "input_grad_maxpool": {
        # The argmax window loads beside the gradient tile: wider tiles spill (aot.py).
        "memory_bound": [_cfg(4, 3, BLOCK_M=64, BLOCK_C=32, BLOCK_CO=16)],
        "compute_bound": [_cfg(4, 3, BLOCK_M=64, BLOCK_C=32, BLOCK_CO=16)],
    },
    "input_grad_up": {
        "memory_bound": [_cfg(4, 3, BLOCK_HR=64, BLOCK_C=32, BLOCK_CO=16)],
        "compute_bound": [_cfg(4, 3, BLOCK_HR=64, BLOCK_C=64, BLOCK_CO=16)],
    },
    "weight_grad": {
        "memory_bound": [
            _cfg(4, 3, BLOCK_CO=32, BLOCK_C=32, BLOCK_P=32),
            _cfg(4, 3, BLOCK_CO=64, BLOCK_C=32, BLOCK_P=32),
        ],
        "compute_bound": [
            _cfg(8, 3, BLOCK_CO=64, BLOCK_C=64, BLOCK_P=32),
            _cfg(4, 3, BLOCK_CO=64, BLOCK_C=32, BLOCK_P=32),
        ],
    },
}

# Hopper (sm_90: wgmma reads its operands from shared memory, only the accumulator is in registers)
# holds tiles that spill on sm_80 (mma.sync keeps A and B fragments in registers too): M256 N32 and
# M128 N128 (8 B and 144 B stack on sm_80, none on sm_90). The trip's fixed pipeline code (barriers,
# wgmma fences, descriptors) is paid per warp, so taller tiles amortise it, and wide N tiles amortise
# the blend, whose cost is per A element, not per output channel. sm_90 SASS, warp instructions per
# K 32 trip (direct / blend) x warps: M128 N32 117 / 232 x 8, M256 N32 153 / 415 x 8 (0.65x / 0.89x
# per pixel), M128 N128 120 / 307 x 8 for four times M128 N32's MMAs. Chosen with the static estimate
# (`python -m unetpp_fast.kernel_resources --estimate`: L4 forward 4.25x / 4.15x -> 3.78x / 3.38x its
# floor at 96^2 / 512^2) with the list lengths, hence the compile count, unchanged. M256 N64 and
# M64 N128 with 4 warps spill on sm_90 as well.
_GPU_HOPPER = {
    "forward": {
        "memory_bound": [
            _cfg(8, 2, BLOCK_M=256, BLOCK_N=32, BLOCK_K=32),
            _cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
        ],
        "compute_bound": [
            _cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
            _cfg(8, 2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
            _cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
        ],
    },
    # The staged forward on sm_90, warp instructions per 32-channel block (staging + 9 taps; plain /
    # max-pooled / upsampled piece): 16x32 N32 w8 876 / 1336 / 2151 (162 registers), 16x32 N64 w8
    # 863 / 1323 / 2138 (252), 8x8 N64 w4 422 / 617 / 936 (141); no spills
    # (`python -m unetpp_fast.kernel_resources --estimate`).
    "forward_staged": {
        "memory_bound": [_cfg(8, 3, BLOCK_H=16, BLOCK_W=32, BLOCK_N=32, SUB=128)],
        "compute_bound": [
            _cfg(8, 3, BLOCK_H=16, BLOCK_W=32, BLOCK_N=64, SUB=128),
            # Deep levels of small images (6x6 to 24x24): blocks that pad less.
            _cfg(4, 3, BLOCK_H=8, BLOCK_W=8, BLOCK_N=64, SUB=128),
        ],
    },
    # 1x1 (UNet++: the heads, memory-bound): H16 W32 N64 spills (144 B stack on sm_90).
    "forward_staged_1x1": {
        "memory_bound": [_cfg(8, 3, BLOCK_H=16, BLOCK_W=32, BLOCK_N=32, SUB=128)],
        "compute_bound": [_cfg(4, 3, BLOCK_H=8, BLOCK_W=8, BLOCK_N=64, SUB=128)],
    },
}

# 3D: every config here compiles without spills on sm_80 and sm_90 (bf16, k = 3, VEC 8 and 1).
_GPU.update(
    {
        "forward_3d": {
            # 4 warps spill on sm_80 (48 B stack) since the per-piece loop over all taps (130f873).
            "memory_bound": [_cfg(8, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)],
            "compute_bound": [_cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)],
        },
        # VEC 1 (odd channel counts; the one-channel input convolution takes the packed forward)
        # spills with 4 warps or BLOCK_M 128 (8 corners), and since the per-piece loop over all taps
        # (130f873) with BLOCK_M 64 on sm_80 (8 B stack).
        "forward_scalar_3d": {
            "memory_bound": [_cfg(8, 3, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)],
            "compute_bound": [_cfg(8, 3, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)],
        },
        "forward_packed_3d": {
            "memory_bound": [_cfg(8, 1, BLOCK_H=16, BLOCK_W=16, BLOCK_N=32)],
            "compute_bound": [_cfg(8, 1, BLOCK_H=16, BLOCK_W=16, BLOCK_N=32)],
        },
        "preactivation_grad_3d": {
            "memory_bound": [_cfg(8, 1, BLOCK_M=128, BLOCK_C=32)],
            "compute_bound": [_cfg(4, 1, BLOCK_M=64, BLOCK_C=32)],
        },
        # 27 unrolled taps: 4 warps, or 8 warps with BLOCK_M 128, spill.
        "input_grad_3d": {
            "memory_bound": [_cfg(8, 3, BLOCK_M=64, BLOCK_C=32, BLOCK_CO=16)],
            "compute_bound": [_cfg(8, 3, BLOCK_M=64, BLOCK_C=32, BLOCK_CO=16)],
        },
        "input_grad_maxpool_3d": {
            "memory_bound": [_cfg(8, 3, BLOCK_M=64, BLOCK_C=32, BLOCK_CO=16)],
            "compute_bound": [_cfg(8, 3, BLOCK_M=64, BLOCK_C=32, BLOCK_CO=16)],
        },
        "input_grad_up_3d": {
            "memory_bound": [_cfg(4, 3, BLOCK_HR=64, BLOCK_C=32, BLOCK_CO=16)],
            "compute_bound": [_cfg(4, 3, BLOCK_HR=64, BLOCK_C=32, BLOCK_CO=16)],
        },
        "weight_grad_3d": {
            "memory_bound": [_cfg(4, 3, BLOCK_CO=32, BLOCK_C=32, BLOCK_P=32)],
            "compute_bound": [_cfg(4, 3, BLOCK_CO=32, BLOCK_C=32, BLOCK_P=32)],
        },
    }
)

# Under the interpreter every operation costs Python time whatever its size: wide blocks, few programs.
_INTERPRETER = {
    "forward": _cfg(4, 1, BLOCK_M=128, BLOCK_N=32, BLOCK_K=32),
    "forward_scalar": _cfg(4, 1, BLOCK_M=128, BLOCK_N=32, BLOCK_K=32),
    "forward_packed": _cfg(4, 1, BLOCK_H=4, BLOCK_W=8, BLOCK_N=32),  # small: tests cross tile edges
    "forward_staged": _cfg(4, 1, BLOCK_H=4, BLOCK_W=8, BLOCK_N=32, SUB=32),  # small: several blocks
    "forward_staged_1x1": _cfg(4, 1, BLOCK_H=4, BLOCK_W=8, BLOCK_N=32, SUB=32),
    "preactivation_grad": _cfg(4, 1, BLOCK_M=256, BLOCK_C=32),
    "input_grad": _cfg(4, 1, BLOCK_M=128, BLOCK_C=32, BLOCK_CO=32),
    "input_grad_maxpool": _cfg(4, 1, BLOCK_M=128, BLOCK_C=32, BLOCK_CO=32),
    "input_grad_up": _cfg(4, 1, BLOCK_HR=32, BLOCK_C=32, BLOCK_CO=32),
    "weight_grad": _cfg(4, 1, BLOCK_CO=32, BLOCK_C=32, BLOCK_P=128),
}


def _table(kernel: str, arch: int) -> dict[str, list[Config]]:
    """The config lists of `kernel` for a GPU of compute capability `arch` (80, 86, 90, ...)."""
    if 90 <= arch < 100 and kernel in _GPU_HOPPER:
        return _GPU_HOPPER[kernel]
    return _GPU[kernel]


def gpu_configs(kernel: str, shape_class_name: str, *, arch: int) -> list[Config]:
    """The autotuning candidates of `kernel` for a shape class on compute capability `arch`."""
    if shape_class_name not in SHAPE_CLASSES:
        raise ValueError(f"shape class must be one of {SHAPE_CLASSES}, got {shape_class_name!r}")
    return list(_table(kernel, arch)[shape_class_name])


def interpreter_config(kernel: str) -> Config:
    return _INTERPRETER[kernel.removesuffix("_3d")]


def all_gpu_configs(kernel: str, *, arch: int) -> list[tuple[str, Config]]:
    """Every (shape class, config) of `kernel` on compute capability `arch`, for ahead-of-time
    compilation and the static estimate."""
    table = _table(kernel, arch)
    return [(cls, cfg) for cls in SHAPE_CLASSES for cfg in table[cls]]
