"""Static estimate of the UNet++ L4 forward per GPU backend: an estimate from sm_90 SASS, not a measurement.

Every convolution of the network (`roofline.unetpp_conv_cases`, bf16, channels_last) is run
through the static model (`unetpp_fast.ops.static_model`) with the kernel configurations each
backend launches (`unetpp_fast.ops.static_kernels`); whole-model sums count each convolution as
often as the network runs it (one conv2 per node of its level, one 1x1 head per supervised node).

    python -m unetpp_fast.kernel_resources --estimate [--json] [--quick] [--backend cuda]
    python -m unetpp_fast.kernel_resources --estimate --backward [--json]   # the cuda fused backward
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from unetpp_fast.bench import roofline
from unetpp_fast.ops import static_model
from unetpp_fast.ops.static_model import ConvShape, KernelModel

SIZES = ((96, 16), (512, 16))  # (image size, batch)
BACKENDS = ("cuda", "triton")
_ELEMENT_SIZE = 2  # bf16


def conv_shapes(size: int, batch: int) -> list[tuple[ConvShape, int]]:
    """(shape, how many times the L4 forward with deep supervision runs it) per distinct conv."""
    cases = roofline.unetpp_conv_cases(size, batch)
    depth = len(roofline.DEFAULT_FILTERS) - 1
    shapes = []
    for case in cases:
        height, width = case.out_hw
        if case.name.startswith("L") and ".conv2" in case.name:
            level = int(case.name[1 : case.name.index(".")])
            count = depth + 1 - level  # nodes X[level, 0..depth-level], each with a conv2
        elif case.name.startswith("head"):
            count = depth  # heads on X[0,1..depth]
        else:
            count = 1
        shape = ConvShape(
            name=case.name,
            batch=case.batch,
            pieces=tuple((p.channels, p.height, p.width, p.resample) for p in case.pieces),
            out_channels=case.out_channels,
            kernel=case.kernel,
            out_height=height,
            out_width=width,
            flops=roofline.conv_flops(case),
            min_bytes=roofline.conv_min_bytes(case, _ELEMENT_SIZE),
            element_size=_ELEMENT_SIZE,
        )
        shapes.append((shape, count))
    return shapes


def _candidates(backend: str, models, shape: ConvShape) -> list[KernelModel]:
    if backend == "cuda":
        from unetpp_fast.ops.static_kernels import cuda_select

        return [cuda_select(models, shape.kernel, shape.out_channels, shape)]
    from unetpp_fast.ops.static_kernels import (
        triton_packed_applies,
        triton_staged_applies,
        triton_vector_width,
    )
    from unetpp_fast.ops.triton import configs

    # The kernel the launcher runs: the packed forward where it applies (a model compiled for the
    # node's C_in and k), the staged forward for 2D 3x3 nodes read in 16-byte vectors, else the
    # main forward at its VEC (the VEC 1 kernel has its own configs); then the configs of the
    # node's shape class (the autotuner's list for it).
    vec = triton_vector_width(shape)
    channels = sum(c for c, *_ in shape.pieces)

    def launched(per_k) -> list[tuple[str, KernelModel]]:
        return [
            (cls, model)
            for cls, model in per_k or ()
            if not model.packed_channels and not model.staged and model.vector_width in (vec, 0)
        ]

    packed = [
        (cls, model) for cls, model in models.get(shape.kernel) or () if model.packed_channels == channels
    ]
    staged = [(cls, model) for cls, model in models.get(shape.kernel) or () if model.staged]
    if packed and triton_packed_applies(shape):
        listed = packed
    elif staged and triton_staged_applies(shape):
        listed = staged
    else:
        listed = launched(models.get(shape.kernel)) or launched(models[3])
    wanted = configs.shape_class(channels, shape.out_channels)
    chosen = [model for cls, model in listed if cls == wanted]
    return chosen or [model for _, model in listed]


def load_models(backends: Sequence[str], quick: bool = False, log=None) -> dict[str, object]:
    """Kernel models per backend; a backend whose kernels cannot be read is reported, not fatal."""
    from unetpp_fast.ops import static_kernels

    found: dict[str, object] = {}
    for backend in backends:
        try:
            if backend == "cuda":
                found[backend] = static_kernels.cuda_forward_models()
            else:
                found[backend] = static_kernels.triton_forward_models(quick=quick, progress=log)
        except (RuntimeError, ImportError, KeyError, StopIteration) as error:
            found[backend] = f"unavailable: {error}"
    return found


def provenance() -> str:
    """Which sources the kernels came from: the checkout's commit and whether kernel sources differ."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "csrc/cuda", "unetpp_fast/ops/triton"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout)"
    if not head:
        return "unknown (no git checkout)"
    return f"commit {head}" + (" with uncommitted kernel sources" if dirty else "")


def build_report(
    models: dict[str, object], sizes: Sequence[tuple[int, int]] = SIZES, sources: str | None = None
) -> dict:
    """Per-node rows and whole-model sums per backend and size, with the model's assumptions."""
    report: dict = {
        "what": "static estimate from sm_90 SASS (not a measurement): UNet++ L4 forward, bf16, channels_last",
        "sources": sources or provenance(),
        "hardware": {
            "sms": static_model.SMS,
            "issue_per_sm_per_clock": static_model.ISSUE_PER_SM_PER_CLOCK,
            "clock_hz": static_model.CLOCK_HZ,
            "tensor_flops": static_model.TENSOR_FLOPS,
            "hbm_bytes_per_s": static_model.HBM_BYTES_PER_S,
            "l2_bytes": static_model.L2_BYTES,
        },
        "assumptions": list(static_model.ASSUMPTIONS),
        "blind_spots": list(static_model.BLIND_SPOTS),
        "kernels": {},
        "results": [],
    }
    for backend, per_k in models.items():
        if isinstance(per_k, str):
            report["kernels"][backend] = per_k
            continue
        flat = (
            (m for variants in per_k.values() for m in variants)
            if backend == "cuda"
            else (m for pairs in per_k.values() for _, m in pairs)
        )
        report["kernels"][backend] = [static_model.kernel_model_dict(m) for m in flat]
        for size, batch in sizes:
            rows = []
            for shape, count in conv_shapes(size, batch):
                row = static_model.best_estimate(shape, _candidates(backend, per_k, shape))
                rows.append(dict(row, count=count))
            expanded = [row for row in rows for _ in range(row["count"])]
            report["results"].append(
                {
                    "backend": backend,
                    "size": size,
                    "batch": batch,
                    "rows": rows,
                    "model": static_model.summarize(expanded),
                }
            )
    return report


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value < 1 else f"{value:.3f}"


def format_markdown(report: dict) -> str:
    """The report as markdown: summary table, per-node tables, kernels, assumptions, blind spots."""
    lines = [
        "# Static performance estimate (from sm_90 SASS, not a measurement)",
        "",
        f"{report['what']}. Generated by `python -m unetpp_fast.kernel_resources --estimate` from",
        f"{report.get('sources', 'unknown sources')}; no GPU has run these kernels. Replace with",
        "measurements (`benchmarks/gpu_check.sh`) when one does. Times in ms; `x floor` = estimate / floor.",
        "",
        "## Whole model (L4 forward, 34 convolutions)",
        "",
        "| backend | input | estimate ms | floor ms | estimate / floor | lower bound ms (x floor) "
        "| worst node (x floor) | bounds (nodes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        model = result["model"]
        bounds = ", ".join(f"{k} {v}" for k, v in model["nodes_by_bound"].items())
        lines.append(
            f"| {result['backend']} | {result['size']}x{result['size']} b{result['batch']} "
            f"| {_fmt(model['estimate_ms'])} | {_fmt(model['floor_ms'])} | {model['ratio']:.2f}x "
            f"| {_fmt(model['estimate_low_ms'])} ({model['estimate_low_ms'] / model['floor_ms']:.2f}x) "
            f"| {model['worst_node']} ({model['worst_node_ratio']:.1f}x) | {bounds} |"
        )
    for backend, kernels in report["kernels"].items():
        if isinstance(kernels, str):
            lines += ["", f"**{backend}**: {kernels}"]
    for result in report["results"]:
        lines += [
            "",
            f"## {result['backend']}, {result['size']}x{result['size']}, batch {result['batch']}",
            "",
            "| node | x | config | CTAs | K trips | instr/trip (warp) | issue ms | tensor ms | memory ms "
            "| estimate ms | bound | floor ms | x floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            lines.append(
                f"| {row['node']} | {row['count']} | {row['config']} | {row['ctas']} "
                f"| {row['k_trips_per_cta']} "
                f"| {row['hot_loop_instr_per_trip']} | {_fmt(row['issue_ms'])} | {_fmt(row['tensor_ms'])} "
                f"| {_fmt(row['memory_ms'])} | {_fmt(row['estimate_ms'])} | {row['bound']} "
                f"| {_fmt(row['floor_ms'])} | {row['ratio']:.1f} |"
            )
    lines += ["", "## Kernels (sm_90 SASS)", ""]
    lines += [
        "| backend | kernel | config | regs | static smem B | local B | warp instr per K trip by mode "
        "| outside hot loops (per CTA + per piece) | tile check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, kernels in report["kernels"].items():
        if isinstance(kernels, str):
            continue
        for k in kernels:
            modes = ", ".join(f"{mode} {cost['instructions']:.0f}" for mode, cost in k["modes"].items())
            parts = [f"{k['overhead']:.0f}"] if k["overhead"] else []
            if k["piece_overhead"]:
                parts.append("per piece " + ", ".join(f"{m} {v:.0f}" for m, v in k["piece_overhead"].items()))
            outside = " + ".join(parts) or "0"
            lines.append(
                f"| {backend} | `{k['kernel']}` | {k['config']} | {k['registers']} | {k['shared_bytes']} "
                f"| {k['local_bytes']} | {modes} | {outside} | {k['flops_check'] or 'ok'} |"
            )
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    lines += ["", "## Assumptions", ""] + [f"- {a}" for a in report["assumptions"]]
    lines += ["", "## Blind spots", ""] + [f"- {b}" for b in report["blind_spots"]]
    return "\n".join(lines) + "\n"


def backward_report() -> dict:
    """The cuda backend's tensor-core fused backward of every L4 convolution (`ops.static_backward`,
    from the built extension's sm_90 SASS), per node and summed over the network, at each size."""
    from unetpp_fast.ops import static_backward
    from unetpp_fast.ops.kernel_resources import extension_library_path, find_cuobjdump
    from unetpp_fast.ops.sass import disassemble

    costs = static_backward.kernel_costs(disassemble(extension_library_path(), find_cuobjdump(), "sm_90"))
    results = []
    for size, batch in SIZES:
        rows = [
            dict(static_backward.estimate_backward(shape, costs), count=count)
            for shape, count in conv_shapes(size, batch)
        ]
        estimate = sum(r["count"] * r["estimate_ms"] for r in rows)
        floor = sum(r["count"] * r["floor_ms"] for r in rows)
        results.append(
            {"size": size, "batch": batch, "rows": rows, "estimate_ms": estimate, "floor_ms": floor}
        )
    return {"what": "cuda fused backward (tensor cores), UNet++ L4, bf16, channels_last", "results": results}


def format_backward_markdown(report: dict) -> str:
    lines = [f"# Static estimate from sm_90 SASS (not a measurement): {report['what']}", ""]
    if report.get("sources"):
        lines += [
            "Generated by `python -m unetpp_fast.kernel_resources --estimate --backward` from "
            f"{report['sources']}; no GPU has run these kernels. Times in ms; `x floor` = estimate / floor "
            "(the larger of 2 x the forward's FLOPs at 990 TFLOP/s and grad_pre, the pieces and the weight "
            "read once and every gradient written once at 4.8 TB/s). "
            "Assumptions: `unetpp_fast/ops/static_backward.py`.",
            "",
        ]
    for result in report["results"]:
        ratio = result["estimate_ms"] / result["floor_ms"]
        lines += [
            f"## {result['size']}x{result['size']}, batch {result['batch']}: "
            f"{result['estimate_ms']:.4g} ms, floor {result['floor_ms']:.4g} ms ({ratio:.2f}x)",
            "",
            "| node | x | estimate ms | floor ms | x floor | bound per kernel | runs |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            bounds = ", ".join(f"{k} {v}" for k, v in r["bounds"].items())
            cells = [
                r["node"],
                r["count"],
                f"{r['estimate_ms']:.4g}",
                f"{r['floor_ms']:.4g}",
                f"{r['ratio']:.1f}",
                bounds,
                "fused" if r["qualifies"] else "gather + cuDNN (channels not a multiple of 8)",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown report here")
    parser.add_argument("--quick", action="store_true", help="Triton: first config per shape class, k=3 only")
    parser.add_argument("--backend", choices=BACKENDS, action="append", help="default: both")
    parser.add_argument("--sources", help="what to name as the kernels' sources (default: git commit)")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's Notes section")
    parser.add_argument(
        "--backward", action="store_true", help="the cuda fused backward instead of the forward"
    )
    args = parser.parse_args(argv)
    if args.backward:
        report = backward_report()
        report["sources"] = args.sources or provenance()
        if args.markdown:
            with open(args.markdown, "w") as handle:
                handle.write(format_backward_markdown(report))
        print(json.dumps(report, indent=1, default=str) if args.json else format_backward_markdown(report))
        return 0
    models = load_models(args.backend or BACKENDS, quick=args.quick, log=lambda m: print(m, file=sys.stderr))
    report = build_report(models, sources=args.sources)
    report["notes"] = list(args.note)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(format_markdown(report))
    print(json.dumps(report, indent=1, default=str) if args.json else format_markdown(report))
    return 0
