"""Configuration of the benchmark suites, read from environment variables.

    BENCH_SMOKE=1          tiny shapes and 1-2 rounds on whatever device is here (CI keeps the suites alive)
    BENCH_DEVICE           'cuda' or 'cpu' (default: cuda when available)
    BENCH_SIZES            input sizes, e.g. '96,512'
    BENCH_BATCH            batch per size for the operator suite, e.g. '96:128,512:16'
    BENCH_MODEL_BATCH      batch per size for the model suite, e.g. '96:64,512:4'
    BENCH_MODEL_SIZES      sizes of the model suite (default: BENCH_SIZES)
    BENCH_DTYPES           'fp32,fp16,bf16'
    BENCH_LAYOUTS          'nchw,cl' (cl = channels_last)
    BENCH_PASSES           'fwd,fwdbwd'
    BENCH_OP_BACKENDS      'eager,compile,triton,cuda' (operator suite; 'eager' is plain PyTorch)
    BENCH_MODEL_BACKENDS   'fused,eager,compile' (model suite; or a fused backend name)
    BENCH_TRAIN_BACKENDS   'fused,eager'
    BENCH_MODELS           'L1,L2,L3,L4,unet,wide_unet'
    BENCH_CONVS            'all' or 'key' (a representative subset) or comma-separated case names
    BENCH_COMPILE_MODE     torch.compile mode of the 'compile' backend (default 'max-autotune')
    BENCH_ROUNDS, BENCH_WARMUP   timed rounds and warm-up calls per measurement
    BENCH_3D_SIZES         volume sides of the 3D cases, e.g. '64' ('' or 'none': no 3D cases; default:
                           64 on a GPU, 32 on a CPU, 16 in smoke mode)
    BENCH_3D_BATCH         batch per side for the 3D operator cases, e.g. '64:2'
    BENCH_3D_MODEL_BATCH   batch per side for the 3D model and training-step cases, e.g. '64:2'
    BENCH_3D_DTYPES        dtypes of the 3D cases (default: bf16 on a GPU, fp32 on a CPU)
    BENCH_3D_MODELS        3D models, among L1..L4, unetpp, unet (default 'L1,L2,L3,L4,unet')
    BENCH_ROWS             a JSON-lines file that receives every result row as soon as it is measured
                           (survives a killed run; benchmarks/report.py reads it)

Every measurement is recorded twice: pytest-benchmark's own statistics (host clock, the timed
function synchronises the device) and, in `extra_info`, the median of CUDA-event (or
perf_counter) timings from `unetpp_fast.bench.time_callable`, which the ratios use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from unetpp_fast.bench import roofline
from unetpp_fast.bench import timing as bench


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _env_sizes(name: str, default: str) -> dict[int, int]:
    pairs = {}
    for item in _env_list(name, default):
        size, batch = item.split(":")
        pairs[int(size)] = int(batch)
    return pairs


KEY_CONVS = (
    "X0,0.conv1 (input)",
    "X1,0.conv1 (maxpool)",
    "L0.conv2",
    "X0,1.conv1 (1+up)",
    "X0,4.conv1 (4+up)",
    "X1,2.conv1 (2+up)",
    "X3,1.conv1 (1+up)",
)


@dataclass
class BenchConfig:
    smoke: bool
    device: torch.device
    sizes: list[int]
    op_batch: dict[int, int]
    model_sizes: list[int]
    model_batch: dict[int, int]
    filters: tuple[int, ...] | None
    dtypes: list[str]
    layouts: list[str]
    passes: list[str]
    op_backends: list[str]
    model_backends: list[str]
    train_backends: list[str]
    models: list[str]
    convs: list[str]
    compile_mode: str
    rounds: int
    warmup: int
    rows_path: str | None
    sizes_3d: list[int] = field(default_factory=list)
    op_batch_3d: dict[int, int] = field(default_factory=dict)
    model_batch_3d: dict[int, int] = field(default_factory=dict)
    dtypes_3d: list[str] = field(default_factory=list)
    models_3d: list[str] = field(default_factory=list)
    eager_cache: dict[Any, float] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> BenchConfig:
        smoke = os.environ.get("BENCH_SMOKE", "") not in ("", "0")
        default_device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(os.environ.get("BENCH_DEVICE", default_device))
        if smoke:
            defaults = {
                "sizes": "16",
                "batch": "16:1",
                "model_batch": "16:2",
                "dtypes": "fp32",
                "layouts": "nchw,cl",
                "passes": "fwd,fwdbwd",
                "op_backends": "eager,reference,cpu,triton,cuda",
                "model_backends": "fused,eager",
                "train_backends": "fused,eager",
                "models": "L1,L4,unet",
                "convs": "X0,0.conv1 (input)|X1,0.conv1 (maxpool)|X0,2.conv1 (2+up)|head (1x1)",
                "rounds": "2",
                "warmup": "1",
            }
        else:
            defaults = {
                "sizes": "96,512",
                "batch": "96:128,512:16",
                "model_batch": "96:64,512:4",
                "dtypes": "fp32,fp16,bf16",
                "layouts": "nchw,cl",
                "passes": "fwd,fwdbwd",
                "op_backends": "eager,compile,triton,cuda",
                "model_backends": "fused,eager,compile",
                "train_backends": "fused,eager",
                "models": "L1,L2,L3,L4,unet,wide_unet",
                "convs": "all",
                "rounds": "20",
                "warmup": "3",
            }
        sizes = [int(s) for s in _env_list("BENCH_SIZES", defaults["sizes"])]
        convs_raw = os.environ.get("BENCH_CONVS", defaults["convs"])
        if convs_raw == "key":
            convs = list(KEY_CONVS)
        elif convs_raw == "all":
            convs = []
        else:
            convs = [c.strip() for c in convs_raw.replace("|", ",,").split(",,") if c.strip()]

        def eager_first(names: list[str]) -> list[str]:
            # the eager row of each group then runs first and gives the others their ratio
            return sorted(names, key=lambda name: name != bench.EAGER)

        return cls(
            smoke=smoke,
            device=device,
            sizes=sizes,
            op_batch=_env_sizes("BENCH_BATCH", defaults["batch"]),
            model_sizes=[int(s) for s in _env_list("BENCH_MODEL_SIZES", ",".join(map(str, sizes)))],
            model_batch=_env_sizes("BENCH_MODEL_BATCH", defaults["model_batch"]),
            filters=(4, 8, 8, 8, 8) if smoke else None,
            dtypes=_env_list("BENCH_DTYPES", defaults["dtypes"]),
            layouts=_env_list("BENCH_LAYOUTS", defaults["layouts"]),
            passes=_env_list("BENCH_PASSES", defaults["passes"]),
            op_backends=eager_first(_env_list("BENCH_OP_BACKENDS", defaults["op_backends"])),
            model_backends=eager_first(_env_list("BENCH_MODEL_BACKENDS", defaults["model_backends"])),
            train_backends=eager_first(_env_list("BENCH_TRAIN_BACKENDS", defaults["train_backends"])),
            models=_env_list("BENCH_MODELS", defaults["models"]),
            convs=convs,
            compile_mode=os.environ.get("BENCH_COMPILE_MODE", "max-autotune"),
            rounds=int(os.environ.get("BENCH_ROUNDS", defaults["rounds"])),
            warmup=int(os.environ.get("BENCH_WARMUP", defaults["warmup"])),
            rows_path=os.environ.get("BENCH_ROWS") or None,
            **_settings_3d(smoke, device),
        )

    def conv_cases_3d(self) -> list[roofline.ConvCase]:
        """The UNet++ convolutions of a 3D network (one input channel), selected as conv_cases;
        a case's pieces are cubes of side `height` (the suites build 5-D inputs from it)."""
        cases = []
        for size in self.sizes_3d:
            kw = {"filters": self.filters} if self.filters else {}
            for case in roofline.unetpp_conv_cases(size, self.op_batch_3d.get(size, 1), in_channels=1, **kw):
                short = case.name.split(" (")[0] if case.name.startswith("L") else case.name
                if self.convs and case.name not in self.convs and short not in self.convs:
                    continue
                cases.append(case)
        return cases

    def conv_cases(self) -> list[roofline.ConvCase]:
        cases = []
        for size in self.sizes:
            batch = self.op_batch.get(size, 1)
            kw = {"filters": self.filters} if self.filters else {}
            for case in roofline.unetpp_conv_cases(size, batch, **kw):
                short = case.name.split(" (")[0] if case.name.startswith("L") else case.name
                if self.convs and case.name not in self.convs and short not in self.convs:
                    continue
                cases.append(case)
        return cases

    def record(self, row: dict[str, Any]) -> None:
        """Append one result row to the rows file (flushed: a later crash keeps it)."""
        _ROWS.append(row)
        if self.rows_path:
            with open(self.rows_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, default=str) + "\n")


def _settings_3d(smoke: bool, device: torch.device) -> dict[str, Any]:
    """The 3D cases' settings: 64^3 bf16 on a GPU (the paper's lung-nodule patches), small on a CPU."""
    gpu = device.type == "cuda"
    default_size = "16" if smoke else ("64" if gpu else "32")
    raw_sizes = os.environ.get("BENCH_3D_SIZES", default_size)
    sizes = (
        []
        if raw_sizes.strip().lower() in ("", "none")
        else [int(s) for s in _env_list("BENCH_3D_SIZES", raw_sizes)]
    )
    batches = "16:2,32:1,64:2"  # 16^3 needs 2 volumes: BatchNorm in training at the 1^3 bottleneck
    return {
        "sizes_3d": sizes,
        "op_batch_3d": _env_sizes("BENCH_3D_BATCH", batches),
        "model_batch_3d": _env_sizes("BENCH_3D_MODEL_BATCH", batches),
        "dtypes_3d": _env_list("BENCH_3D_DTYPES", "bf16" if gpu and not smoke else "fp32"),
        "models_3d": _env_list("BENCH_3D_MODELS", "L1,L4" if smoke else "L1,L2,L3,L4,unet"),
    }


_CONFIG = BenchConfig.from_env()
_ROWS: list[dict[str, Any]] = []


def _case_id(case: roofline.ConvCase) -> str:
    return f"{case.image_size}px-b{case.batch}-{case.name.replace(' ', '')}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = _CONFIG
    fixtures = metafunc.fixturenames
    if "conv_case" in fixtures:
        cases = cfg.conv_cases()
        metafunc.parametrize("conv_case", cases, ids=[_case_id(c) for c in cases])
    if "dtype_name" in fixtures:
        metafunc.parametrize("dtype_name", cfg.dtypes)
    if "layout" in fixtures:
        metafunc.parametrize("layout", cfg.layouts)
    if "bench_pass" in fixtures:
        metafunc.parametrize("bench_pass", cfg.passes)
    if "op_backend" in fixtures:
        metafunc.parametrize("op_backend", cfg.op_backends)
    if "model_name" in fixtures:
        metafunc.parametrize("model_name", cfg.models)
    if "model_backend" in fixtures:
        metafunc.parametrize("model_backend", cfg.model_backends)
    if "train_backend" in fixtures:
        metafunc.parametrize("train_backend", cfg.train_backends)
    if "model_size" in fixtures:
        metafunc.parametrize("model_size", cfg.model_sizes)
    if "conv_case_3d" in fixtures:
        cases = cfg.conv_cases_3d()
        metafunc.parametrize("conv_case_3d", cases, ids=[_case_id(c).replace("px", "cube") for c in cases])
    if "size_3d" in fixtures:
        metafunc.parametrize("size_3d", cfg.sizes_3d)
    if "dtype_name_3d" in fixtures:
        metafunc.parametrize("dtype_name_3d", cfg.dtypes_3d)
    if "model_name_3d" in fixtures:
        metafunc.parametrize("model_name_3d", cfg.models_3d)


@pytest.fixture(scope="session")
def bench_cfg() -> BenchConfig:
    return _CONFIG


@pytest.fixture(scope="session")
def ceilings(bench_cfg: BenchConfig) -> dict[str, float]:
    """Copy bandwidth and matmul rate of this device, measured once per run (the roofline's ceilings)."""
    device = bench_cfg.device
    if bench_cfg.smoke or device.type != "cuda":
        bandwidth = roofline.measure_copy_bandwidth(device, nbytes=1 << 24, rounds=3)
        rates = {"fp32": roofline.measure_matmul_rate(device, torch.float32, n=256, rounds=3)}
        rates["fp16"] = rates["bf16"] = rates["fp64"] = rates["fp32"]
    else:
        bandwidth = roofline.measure_copy_bandwidth(device, nbytes=1 << 31)
        rates = {
            name: roofline.measure_matmul_rate(device, bench.dtype_from_name(name), n=8192)
            for name in ("fp32", "fp16", "bf16")
        }
    result = {"copy_bytes_per_s": bandwidth, **{f"matmul_flop_per_s_{k}": v for k, v in rates.items()}}
    bench_cfg.record({"suite": "ceilings", "device": _device_name(device), **result})
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


class Measurer:
    """Times a callable twice (pytest-benchmark and `time_callable`) and records result rows."""

    def __init__(self, benchmark: Any, cfg: BenchConfig) -> None:
        self.benchmark = benchmark
        self.cfg = cfg

    def run(self, fn: Any, group: str, row: dict[str, Any], rounds: int | None = None) -> dict[str, Any]:
        """Time `fn`: pytest-benchmark's statistics use the host clock around a synchronised call;
        `median_ms` (what the ratios use) is the median of CUDA-event / perf_counter timings."""
        device = self.cfg.device
        rounds = rounds or self.cfg.rounds

        def synced() -> None:
            fn()
            bench.synchronize(device)

        stats = bench.time_callable(fn, device, warmup=self.cfg.warmup, rounds=rounds)
        self.benchmark.group = group
        self.benchmark.pedantic(synced, rounds=rounds, warmup_rounds=0, iterations=1)
        timer = "cuda-events" if device.type == "cuda" else "perf_counter"
        return dict(
            row,
            device=_device_name(device),
            median_ms=stats.median_s * 1e3,
            min_ms=stats.min_s * 1e3,
            rounds=rounds,
            timer=timer,
        )

    def record(self, row: dict[str, Any]) -> None:
        """Put `row` into the benchmark's extra_info (pytest-benchmark JSON) and the rows file."""
        for key, value in row.items():
            self.benchmark.extra_info[key] = value
        self.cfg.record(row)


@pytest.fixture
def measure(benchmark: Any, bench_cfg: BenchConfig) -> Measurer:
    return Measurer(benchmark, bench_cfg)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    rows = [r for r in _ROWS if r.get("suite") in ("operator", "model", "train")]
    if not rows:
        return
    terminalreporter.section("unetpp-fast benchmark rows (median, ratio to eager in the same run)")
    for r in rows:
        ratio = r.get("ratio_vs_eager")
        ratio_text = f"{ratio:6.2f}x" if isinstance(ratio, float) else "   -   "
        what = r.get("conv") or r.get("model")
        terminalreporter.write_line(
            f"{r['suite']:8s} {what:24s} {r.get('backend', ''):10s} {r.get('dtype', ''):5s} "
            f"{r.get('layout', ''):5s} {r.get('pass', ''):7s} {r['median_ms']:10.4f} ms  {ratio_text}"
        )
