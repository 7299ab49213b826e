"""Host side of the kernel launchers: the piece descriptor table, layouts, precision, and the launch seam.

Launch path per call, once a kernel's config is known: build (or find) the piece table, look the
compiled kernel up by a small key, launch it. Everything else (validation) happens once, in the
operator layer (fused_op), never here.

The seam: every launch goes through `runtime()` (set_runtime installs another). The default runs
Triton for real (compiled kernels on a GPU, or the interpreter under TRITON_INTERPRET=1);
benchmarks/host_path.py installs a stub that records compilations and counts launches, so the
GPU host path is measured on a CPU without patching anything else.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import triton

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.triton import configs

# Pixel counts index rows with int32 inside the kernels; element offsets are int64.
MAX_PIXELS = 2**31 - 2**20

# One row of int64 per piece (the kernels read it with virtual_input.piece_row). 2D pieces are the
# D = 1 case: depth 1, depth stride 0, depth scale 0. The last three fields repeat the channel count
# in the field of the piece's read class (one source pixel: none / up_nearest; max-pool window;
# blend of corners), 0 in the others: the forward runs one channel loop per class on these counts.
TABLE_FIELDS = ("address", "stride_n", "stride_c", "stride_d", "stride_h", "stride_w", "depth", "height",
                "width", "channels", "mode", "channel_offset", "scale_d_bits", "scale_h_bits",
                "scale_w_bits", "direct_channels", "pool_channels", "blend_channels")  # fmt: skip
ROW = len(TABLE_FIELDS)


@functools.lru_cache(maxsize=1)
def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1; read once: Triton itself reads
    it when the kernels are decorated, so it cannot change within a process)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """Ceiling division in plain Python (triton.cdiv is a jit function: slower on the host)."""
    return -(-a // b)


def empty_output(
    shape: Sequence[int],
    like: torch.Tensor,
    memory_format: torch.memory_format = torch.contiguous_format,
    dtype: torch.dtype | None = None,
    strides: Sequence[int] | None = None,
) -> torch.Tensor:
    """Every tensor a kernel writes is allocated here (tests replace it to poison outputs with NaN).
    `strides`, when known (a launch plan's earlier output), must be those of `memory_format`:
    empty_strided is the cheaper call."""
    if strides is not None:
        return torch.empty_strided(
            tuple(shape), tuple(strides), dtype=dtype or like.dtype, device=like.device
        )
    return torch.empty(
        tuple(shape), dtype=dtype or like.dtype, device=like.device, memory_format=memory_format
    )


def on_gpu_layout() -> bool:
    """Whether the launchers take the GPU path (channels_last tensors, compiled kernels): everywhere
    but the interpreter, so the host-path harness runs the GPU path on CPU tensors."""
    return not interpreting()


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """On the GPU path the kernels read channels_last (channels_last_3d) tensors: the channel stride
    is then 1 (C_CONTIG), so channel loads are contiguous (a piece-sized copy at most, never a
    concatenation). The interpreter reads any strides as given, which is how the strided
    addressing is tested."""
    if not interpreting():
        fmt = conv_spec.channels_last_format(t.dim())
        if not t.is_contiguous(memory_format=fmt):
            return t.contiguous(memory_format=fmt)
    return t


def dims_of(t: torch.Tensor) -> int:
    """Spatial dimensions of a 4-D (2) or 5-D (3) tensor."""
    return t.dim() - 2


def strides5(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(n, c, d, h, w) strides; a 4-D tensor has depth stride 0 (the D = 1 case)."""
    s = t.stride()
    return s if len(s) == 5 else (s[0], s[1], 0, s[2], s[3])


def spatial3(shape: Sequence[int]) -> tuple[int, int, int]:
    """(D, H, W) of a 4-D or 5-D shape (D = 1 in 2D)."""
    return tuple(shape[2:]) if len(shape) == 5 else (1, shape[2], shape[3])


def weight_strides5(weight: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(co, c, kd, kh, kw) strides of a 4-D or 5-D weight (kd 0 in 2D)."""
    return strides5(weight)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots are exact (ieee) unless the user allowed TF32 for matmuls; other dtypes ignore it."""
    if dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=1024)
def align_corners_scale(size_in: int, size_out: int) -> float:
    """(in - 1) / (out - 1) rounded once to fp32, as PyTorch's bilinear align_corners=True computes it."""
    if size_out <= 1:
        return 0.0
    return float(np.float32(size_in - 1) / np.float32(size_out - 1))


@functools.lru_cache(maxsize=1024)
def _scale_bits(size_in: int, size_out: int) -> int:
    """The fp32 scale's bit pattern, as the int64 table carries it (the kernel bitcasts it back)."""
    return struct.unpack("<i", struct.pack("<f", align_corners_scale(size_in, size_out)))[0]


def check_pixel_count(count: int, what: str) -> None:
    if count > MAX_PIXELS:
        raise ValueError(
            f"{what} has {count} pixels (N*H*W); the triton backend indexes pixels with int32 and "
            f"takes at most {MAX_PIXELS}: split the batch"
        )


def check_piece_extent(piece: torch.Tensor, what: str) -> None:
    """The kernels address a piece's elements with int32 offsets (virtual_input.source_geometry)."""
    extent = sum((size - 1) * abs(stride) for size, stride in zip(piece.shape, piece.stride()) if size > 0)
    if extent >= 2**31:
        raise ValueError(
            f"{what} spans {extent + 1} elements; the triton backend addresses a piece with int32 "
            f"offsets and takes at most 2**31: split the batch"
        )


def piece_rows(pieces: Sequence[torch.Tensor], codes: Sequence[int]) -> tuple[int, ...]:
    """The flat table contents: ROW int64 values per piece (see TABLE_FIELDS)."""
    rows: list[int] = []
    offset = 0
    for index, (piece, code) in enumerate(zip(pieces, codes)):
        check_piece_extent(piece, f"pieces[{index}]")
        c = piece.shape[1]
        d, h, w = spatial3(piece.shape)
        if code == conv_spec.UP_BILINEAR_AC:
            sd, sh, sw = _scale_bits(d, 2 * d), _scale_bits(h, 2 * h), _scale_bits(w, 2 * w)
        else:
            sd = sh = sw = 0
        by_class = read_class_channels(code, c)
        rows += (piece.data_ptr(), *strides5(piece), d, h, w, c, code, offset, sd, sh, sw, *by_class)
        offset += c
    return tuple(rows)


def read_class_channels(code: int, channels: int) -> tuple[int, int, int]:
    """(direct, pool, blend) channel counts of a piece: its channels under its read class, else 0."""
    if code in (conv_spec.NONE, conv_spec.UP_NEAREST):
        return channels, 0, 0
    if code == conv_spec.MAXPOOL2:
        return 0, channels, 0
    return 0, 0, channels


def vector_width(pieces: Sequence[torch.Tensor]) -> int:
    """Elements per 16-byte vector when every piece (channel stride 1) starts 16-byte aligned and
    has its channel count and other strides in whole vectors (UNet++ past the input conv: 32, 64,
    ...); else 1. The forward then hints its channel loads as 16-byte vectors."""
    vec = vector_width_if_aligned(pieces)
    return vec if all(p.data_ptr() % 16 == 0 for p in pieces) else 1


def vector_width_if_aligned(pieces: Sequence[torch.Tensor], weight: torch.Tensor | None = None) -> int:
    """vector_width for pieces (and a weight) whose addresses are 16-byte aligned: metadata only
    (shapes, strides). A weight must have C_in contiguous and its other strides in whole vectors,
    so the forward reads it in 16-byte vectors along C_in."""
    vec = 16 // pieces[0].element_size()
    for p in pieces:
        s_n, _, s_d, s_h, s_w = _used_strides(p)
        if p.shape[1] % vec or s_n % vec or s_d % vec or s_h % vec or s_w % vec:
            return 1
    if weight is not None:
        s_co, _, s_kd, s_kh, s_kw = _used_strides(weight)
        if weight.stride(1) != 1 or s_co % vec or s_kd % vec or s_kh % vec or s_kw % vec:
            return 1
    return vec


def _used_strides(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """strides5, with 0 for the axes of size 1: their index is always 0, so their stride never
    moves an address (a 1x1 weight in channels_last has kh, kw strides of 1)."""
    sizes = t.shape if t.dim() == 5 else (t.shape[0], t.shape[1], 1, t.shape[2], t.shape[3])
    return tuple(stride if size > 1 else 0 for stride, size in zip(strides5(t), sizes))


_CAPTURED: list = []  # tables (and host copies) a captured CUDA graph reads: kept for good


class TableCache:
    """Device tables by content. The key is the content (the rows themselves, or metadata and
    addresses that determine them), so an entry can never be stale; a hit (the steady state of a
    training loop: the caching allocator hands out the same addresses) costs no copy. A table
    used during CUDA-graph capture is kept alive for good: the graph reads it at every replay
    (and its host copy, for a table first made during the capture)."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.captured = _CAPTURED  # one list for every cache: evicting a cache never frees them

    def get(self, rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return self.get_keyed((device, rows), lambda: rows, device)

    def get_keyed(self, key, make_rows: Callable[[], Sequence[int]], device: torch.device) -> torch.Tensor:
        """The table of `key`, whose rows `make_rows()` builds on a miss; `key` must determine them."""
        table = self.entries.get(key)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if table is not None:
            self.entries.move_to_end(key)
            if capturing:
                self.captured.append(table)
            return table
        if device.type == "cuda":
            host = torch.tensor(make_rows(), dtype=torch.int64).pin_memory()
            table = host.to(device, non_blocking=True)
            if capturing:
                self.captured.append(host)
        else:
            table = torch.tensor(make_rows(), dtype=torch.int64)
        if capturing:
            self.captured.append(table)
        self.entries[key] = table
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return table


_TABLES = TableCache()


def piece_table(pieces: Sequence[torch.Tensor], codes: Sequence[int]) -> torch.Tensor:
    """The per-call descriptor table of the pieces, an int64 tensor on their device."""
    return _TABLES.get(piece_rows(pieces, codes), pieces[0].device)


def table_of(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """A descriptor table from rows already built (piece_rows), e.g. a subset of the pieces."""
    return _TABLES.get(tuple(rows), device)


def keyed_table(key, make_rows: Callable[[], Sequence[int]], device: torch.device) -> torch.Tensor:
    """A descriptor table cached under `key`, which must determine the rows (e.g. a launch plan's
    metadata key and the pieces' addresses); `make_rows` builds them on a miss."""
    return _TABLES.get_keyed(("keyed", device, key), make_rows, device)


# ---------------------------------------------------------------------------------------------
# Runtimes: how a (kernel, constexprs, config) becomes a compiled kernel, and how it is launched.


class TritonRuntime:
    """Triton itself: compile once per specialisation with `warmup`, then launch the compiled kernel
    directly (no binder, no autotuner on the per-call path)."""

    runs_gpu_path_on_cpu = False  # True only for a stub (benchmarks/host_path.py)
    name = "triton"

    def compile(self, kernel, args: Sequence, constexprs: dict, config: triton.Config):
        return kernel.warmup(
            *args, grid=(1,), **constexprs, **config.kwargs,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip

    def launch(self, compiled, grid: tuple, args: Sequence) -> None:
        compiled[grid](*args)

    def bench(self, fn: Callable[[], None]) -> float:
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")

    def device_name(self, device: torch.device) -> str:
        return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class InterpreterRuntime:
    """TRITON_INTERPRET=1: one small fixed config per kernel (the interpreter cannot benchmark)."""

    runs_gpu_path_on_cpu = False
    name = "interpreter"

    def launch_interpreted(self, kernel, grid: tuple, args: Sequence, constexprs: dict, config) -> None:
        kernel[grid](*args, **constexprs, **config.all_kwargs())


_RUNTIME: list = [None]


def runtime():
    if _RUNTIME[0] is None:
        _RUNTIME[0] = InterpreterRuntime() if interpreting() else TritonRuntime()
    return _RUNTIME[0]


def set_runtime(new) -> object:
    """Install another runtime (None: the default); returns the previous one. The host-path harness
    installs a stub here; compiled kernels and tuning choices are forgotten with the old runtime."""
    previous = _RUNTIME[0]
    _RUNTIME[0] = new
    _COMPILED.clear()
    _CHOSEN.clear()
    PLANS.clear()
    _DISK["loaded"] = False  # re-read: the tuning file may have been pointed elsewhere meanwhile
    return previous


# ---------------------------------------------------------------------------------------------
# Tuning: per (kernel, constexprs, dtype, shape class, pixel bucket), persisted across processes.

_COMPILED: dict = {}  # (kernel name, (dtype, constexprs), config) -> (compiled kernel, tail, config)
_CHOSEN: dict = {}  # tuning key -> (compiled kernel, tail, config): the per-call fast path
# Launch plans of the launchers (e.g. fused_conv_forward): keyed on call metadata only, they hold
# compiled kernels, so they go with the runtime that compiled them.
PLANS: dict = {}
MAX_PLANS = 4096
_DISK: dict = {"loaded": False, "entries": {}}


@functools.cache
def device_arch(device: torch.device) -> int:
    """Compute capability as 80, 86, 90, ... of a CUDA device (the config lists differ per arch);
    90 for any other device: a stubbed runtime on the CPU (benchmarks/host_path.py) stands for the
    H200 the kernels are designed for."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def pixel_bucket(pixels: int) -> int:
    """Powers of 4 from 4096 to 2**28: a new batch or resolution in the same bucket re-uses the
    tuned config (and every bucket the compiled kernels: sizes are not specialised)."""
    bits = max(12, (pixels - 1).bit_length())
    return 1 << min(bits + (bits & 1), 28)


def tuning_file() -> str:
    root = os.environ.get("UNETPP_FAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "unetpp_fast"
    )
    return os.path.join(root, f"triton_tuning_{triton.__version__}.json")


def _disk_entries() -> dict:
    if not _DISK["loaded"]:
        _DISK["loaded"] = True
        try:
            with open(tuning_file()) as handle:
                _DISK["entries"] = json.load(handle)
        except (OSError, ValueError):
            _DISK["entries"] = {}
    return _DISK["entries"]


def _persist(key: str, index: int) -> None:
    entries = _disk_entries()
    entries[key] = index
    path = tuning_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle, sort_keys=True, indent=0)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache directory only costs re-tuning in the next process


def _compiled(rt, kernel, name: str, key: tuple, config, args, constexprs):
    """(compiled kernel, constexpr tail of its argument list, config), compiled once per config."""
    ckey = (name, key, tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
    compiled = _COMPILED.get(ckey)
    if compiled is None:
        handle = rt.compile(kernel, args, constexprs, config)
        tail = tuple(constexprs.get(n, config.kwargs.get(n)) for n in kernel.arg_names[len(args) :])
        compiled = _COMPILED[ckey] = (handle, tail, config)
    return compiled


def launch(
    kernel,
    kernel_name: str,
    shape_class: str,
    grid: Callable[[dict], tuple],
    pixels: int,
    dtype: torch.dtype,
    device: torch.device,
    args: Sequence,
    constexprs: dict,
) -> None:
    """Run `kernel` on positional `args` with `constexprs`, its block config tuned once per
    (constexprs, dtype, shape class, pixel bucket) and then launched directly.

    `args` holds every non-constexpr argument in order; `dtype` is the data type of the pieces and
    weight. Every int argument is unspecialised in the kernels (do_not_specialize) and weight and
    bias are not assumed aligned, so one compiled kernel serves every size, stride and view."""
    rt = runtime()
    if isinstance(rt, InterpreterRuntime):
        config = configs.interpreter_config(kernel_name)
        rt.launch_interpreted(kernel, grid(config.kwargs), args, constexprs, config)
        return
    handle, call_grid, tail, _ = prepare(kernel, kernel_name, shape_class, grid, pixels, dtype, device, args,
                                         constexprs)  # fmt: skip
    rt.launch(handle, call_grid, (*args, *tail))


def prepare(
    kernel,
    kernel_name: str,
    shape_class: str,
    grid: Callable[[dict], tuple],
    pixels: int,
    dtype: torch.dtype,
    device: torch.device,
    args: Sequence,
    constexprs: dict,
) -> tuple[object, tuple, tuple, bool]:
    """What `launch` launches, on a compiling runtime: (compiled kernel, grid, constexpr tail of the
    argument list, settled). Not settled: a stand-in config chosen inside a CUDA-graph capture,
    which a caller must not keep (the next call tunes). Tunes and compiles on first use."""
    rt = runtime()
    key = (dtype, tuple(constexprs.items()))
    tkey = (kernel_name, key, shape_class, pixel_bucket(pixels), device.index)
    chosen = _CHOSEN.get(tkey)
    settled = True
    if chosen is None:
        candidates = configs.gpu_configs(kernel_name, shape_class, arch=device_arch(device))
        index, settled = _tune(rt, kernel, kernel_name, key, tkey, candidates, grid, device, args, constexprs)
        chosen = _compiled(rt, kernel, kernel_name, key, candidates[index], args, constexprs)
        if settled:  # a stand-in chosen inside a CUDA-graph capture is not kept: tune after it
            _CHOSEN[tkey] = chosen
    handle, tail, config = chosen
    return handle, _grid3(grid(config.kwargs)), tail, settled


def _grid3(grid: tuple) -> tuple:
    """A compiled kernel's launcher indexes grid[0..2] (JIT launches pad it; direct launches must)."""
    return grid if len(grid) == 3 else (*grid, 1, 1)[:3]


def _tune(rt, kernel, name, key, tkey, candidates, grid, device, args, constexprs) -> tuple[int, bool]:
    """(index of the config to run, whether that is the settled choice)."""
    # The candidate list is part of the key: an edited configs.py never maps to a stale index.
    listed = [(sorted(c.kwargs.items()), c.num_warps, c.num_stages) for c in candidates]
    disk_key = "|".join(map(str, (rt.device_name(device), name, *key, *tkey[2:4], listed)))
    stored = _disk_entries().get(disk_key)
    if isinstance(stored, int) and 0 <= stored < len(candidates):
        return stored, True
    if len(candidates) == 1:
        return 0, True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return 0, False  # no timing inside a graph capture (it would be recorded, not run)
    times = []
    for config in candidates:
        compiled, tail, _ = _compiled(rt, kernel, name, key, config, args, constexprs)
        call_grid = _grid3(grid(config.kwargs))
        full = (*args, *tail)
        times.append(rt.bench(functools.partial(rt.launch, compiled, call_grid, full)))
    best = min(range(len(times)), key=times.__getitem__)
    _persist(disk_key, best)
    return best, True
