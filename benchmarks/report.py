"""Turn benchmark results into a markdown report and a short final table.

    python benchmarks/report.py --rows RUN/rows.jsonl [--json RUN/operator.json ...]
                                [--steps RUN/steps.tsv] [--out RUN/report.md]

Inputs: the JSON-lines rows file the suites write (BENCH_ROWS, kept even when a run is killed)
and/or pytest-benchmark JSON files (`--benchmark-json`; each benchmark's `extra_info` is a row),
and optionally the step log of benchmarks/gpu_check.sh (name, status, seconds per line). Writes the
full report to --out and prints the short table (ratios vs eager and torch.compile per pruning
level, training step and its memory, operator summary) on stdout. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

Row = dict[str, Any]
MODEL_ORDER = [
    "UNet++ L1",
    "UNet++ L2",
    "UNet++ L3",
    "UNet++ L4",
    "UNet++ (all heads)",
    "U-Net",
    "wide U-Net",
]


def load_rows(rows_paths: Iterable[str], json_paths: Iterable[str]) -> list[Row]:
    """Rows from JSON-lines files and pytest-benchmark JSON files, de-duplicated."""
    rows: list[Row] = []
    seen: set[str] = set()

    def add(row: Row) -> None:
        key = json.dumps(row, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            rows.append(row)

    for path in rows_paths:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if line:
                    try:
                        add(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line cut short by a killed run
    for path in json_paths:
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError):
            continue
        for entry in data.get("benchmarks", []):
            info = entry.get("extra_info") or {}
            if "suite" in info:
                add(dict(info))
    return rows


def load_steps(path: str | None) -> list[tuple[str, str, str]]:
    if not path or not os.path.exists(path):
        return []
    steps = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                steps.append((parts[0], parts[1], parts[2]))
    return steps


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return a / b


def table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in body:
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _preferred(keys: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """The (dtype, layout) to headline: bf16 channels_last first, as a GPU user would run."""
    keys = set(keys)
    for choice in (("bf16", "cl"), ("bf16", "nchw"), ("fp16", "cl"), ("fp32", "cl"), ("fp32", "nchw")):
        if choice in keys:
            return choice
    return sorted(keys)[0] if keys else None


def model_table(rows: list[Row], dtype: str, layout: str, size: int) -> tuple[list[str], list[list[Any]]]:
    """Per model: images/s per backend, fused/eager, fused/compile, seconds per 10k images."""
    by_model: dict[str, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        if r.get("suite") == "model" and r.get("dtype") == dtype and r.get("layout") == layout:
            if r.get("size") == size:
                by_model[r["model"]][r["backend"]] = r
    fused_names = [
        b for b in ("fused", "cuda", "triton", "cpu", "reference") if any(b in m for m in by_model.values())
    ]
    header = ["model", "batch"] + [f"{b} img/s" for b in fused_names] + ["eager img/s", "compile img/s"]
    header += [f"{b}/eager" for b in fused_names] + [f"{b}/compile" for b in fused_names]
    main = fused_names[0] if fused_names else "fused"
    header += [f"{main} s/10k", "eager s/10k"]
    body = []
    models = sorted(by_model, key=lambda m: MODEL_ORDER.index(m) if m in MODEL_ORDER else 99)
    for model in models:
        entries = by_model[model]

        def ips(backend: str, entries: dict[str, Row] = entries) -> float | None:
            return entries.get(backend, {}).get("images_per_s")

        batch = next(iter(entries.values())).get("batch")
        cells: list[Any] = [model, batch] + [ips(b) for b in fused_names] + [ips("eager"), ips("compile")]
        cells += [ratio(ips(b), ips("eager")) for b in fused_names]
        cells += [ratio(ips(b), ips("compile")) for b in fused_names]
        main = fused_names[0] if fused_names else None
        cells += [
            entries.get(main, {}).get("s_per_10k") if main else None,
            entries.get("eager", {}).get("s_per_10k"),
        ]
        body.append(cells)
    return header, body


def train_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    groups: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        if r.get("suite") == "train":
            groups[(r.get("size"), r.get("batch"), r.get("dtype"), r.get("layout"))][r["backend"]] = r
    header = [
        "size",
        "batch",
        "dtype",
        "layout",
        "backend",
        "ms/step",
        "img/s",
        "vs eager",
        "peak MiB",
        "peak vs eager",
    ]
    body = []
    for key in sorted(groups, key=str):
        entries = groups[key]
        eager = entries.get("eager", {})
        for backend, r in sorted(entries.items(), key=lambda kv: kv[0] != "eager"):
            body.append(
                [
                    *key,
                    backend,
                    r.get("median_ms"),
                    r.get("images_per_s"),
                    ratio(eager.get("median_ms"), r.get("median_ms")),
                    r.get("peak_memory_mib"),
                    ratio(r.get("peak_memory_mib"), eager.get("peak_memory_mib")),
                ]
            )
    return header, body


def memory_table(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    header = [
        "size",
        "batch",
        "saved fused MiB",
        "saved plain MiB",
        "fused/plain",
        "naive fused",
        "naive plain",
    ]
    body = [
        [
            r.get("size"),
            r.get("batch"),
            r.get("saved_fused_mib"),
            r.get("saved_plain_mib"),
            r.get("saved_ratio"),
            r.get("naive_fused_mib"),
            r.get("naive_plain_mib"),
        ]
        for r in rows
        if r.get("suite") == "memory"
    ]
    return header, body


def operator_summary(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    """Geometric mean over convs of the speed-up vs eager, per (size, backend, dtype, layout, pass)."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if (
            r.get("suite") == "operator"
            and r.get("ratio_vs_eager") is not None
            and r.get("backend") != "eager"
        ):
            groups[(r.get("size"), r.get("backend"), r.get("dtype"), r.get("layout"), r.get("pass"))].append(
                r
            )
    header = [
        "size",
        "backend",
        "dtype",
        "layout",
        "pass",
        "convs",
        "geomean vs eager",
        "min",
        "max",
        "mean fraction of floor",
    ]
    body = []
    for key in sorted(groups, key=str):
        ratios = [r["ratio_vs_eager"] for r in groups[key]]
        fractions = [r["fraction_of_floor"] for r in groups[key] if r.get("fraction_of_floor")]
        body.append(
            [
                *key,
                len(ratios),
                geomean(ratios),
                min(ratios),
                max(ratios),
                sum(fractions) / len(fractions) if fractions else None,
            ]
        )
    return header, body


def operator_rows(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    header = [
        "size",
        "batch",
        "conv",
        "backend",
        "dtype",
        "layout",
        "pass",
        "median ms",
        "vs eager",
        "rel err",
        "GFLOP",
        "min MB",
        "bound",
        "floor us",
        "fraction of floor",
    ]
    body = [
        [
            r.get("size"),
            r.get("batch"),
            r.get("conv"),
            r.get("backend"),
            r.get("dtype"),
            r.get("layout"),
            r.get("pass"),
            r.get("median_ms"),
            r.get("ratio_vs_eager"),
            r.get("rel_err_vs_fp32"),
            r.get("gflop"),
            r.get("min_mb"),
            r.get("bound"),
            r.get("floor_us"),
            r.get("fraction_of_floor"),
        ]
        for r in rows
        if r.get("suite") == "operator"
    ]
    return header, body


def model_keys(rows: list[Row]) -> list[tuple[int, str, str]]:
    keys = {(r.get("size"), r.get("dtype"), r.get("layout")) for r in rows if r.get("suite") == "model"}
    return sorted(keys, key=str)


def full_report(rows: list[Row], steps: list[tuple[str, str, str]]) -> str:
    out = ["# unetpp-fast benchmark report", ""]
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    out.append(
        f"Device(s): {', '.join(devices) or 'unknown'}. "
        "Timings are medians; ratios are between rows measured in the same run."
    )
    out.append("")
    if steps:
        out += ["## Steps", "", table(["step", "status", "seconds"], steps), ""]
    ceilings = [r for r in rows if r.get("suite") == "ceilings"]
    if ceilings:
        c = ceilings[-1]
        out += ["## Ceilings (measured in this run)", ""]
        out.append(f"- copy bandwidth (read + write): {fmt(c.get('copy_bytes_per_s', 0) / 1e9)} GB/s")
        for k, v in c.items():
            if k.startswith("matmul_flop_per_s_"):
                out.append(f"- matmul {k.rsplit('_', 1)[1]}: {fmt(v / 1e12)} TFLOP/s")
        out.append("")
    for size, dtype, layout in model_keys(rows):
        header, body = model_table(rows, dtype, layout, size)
        out += [
            f"## Inference, {size}px, {dtype}, {layout} (the paper's Fig. 3: pruning levels)",
            "",
            table(header, body),
            "",
        ]
    header, body = train_table(rows)
    if body:
        out += ["## Training step (forward + backward + Adam)", "", table(header, body), ""]
    header, body = memory_table(rows)
    if body:
        out += [
            "## Bytes saved for backward (unique storages, parameters excluded)",
            "",
            table(header, body),
            "",
        ]
    header, body = operator_summary(rows)
    if body:
        out += ["## Operator suite summary", "", table(header, body), ""]
    header, body = operator_rows(rows)
    if body:
        out += ["## Operator suite, every row", "", table(header, body), ""]
    errors = [r for r in rows if r.get("error")]
    if errors:
        out += ["## Errors", ""] + [
            f"- {r.get('model') or r.get('conv')} / {r.get('backend')}: {r['error']}" for r in errors
        ]
    return "\n".join(out) + "\n"


def short_table(rows: list[Row], steps: list[tuple[str, str, str]]) -> str:
    """The few lines a reader needs: per pruning level, training, memory, operator geomeans."""
    out = []
    if steps:
        failed = [
            f"{name} ({status})"
            for name, status, _ in steps
            if status not in ("ok",) and not status.startswith("skipped")
        ]
        skipped = [
            f"{name}: {status.replace('skipped ', '')}"
            for name, status, _ in steps
            if status.startswith("skipped")
        ]
        ran = len(steps) - len(skipped)
        out.append(
            f"steps: {ran - len(failed)}/{ran} passed"
            + (" -- FAILED: " + ", ".join(failed) if failed else "")
        )
        if skipped:
            out.append("skipped: " + "; ".join(skipped))
    keys = model_keys(rows)
    by_choice: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for size, dtype, layout in keys:
        by_choice[size].append((dtype, layout))
    for size, choices in sorted(by_choice.items(), key=str):
        choice = _preferred(choices)
        if choice is None:
            continue
        header, body = model_table(rows, choice[0], choice[1], size)
        keep = [
            i
            for i, h in enumerate(header)
            if h in ("model", "batch") or ("/" in h and not h.endswith("s/10k")) or h == header[-2]
        ]
        out.append(f"inference {size}px {choice[0]} {choice[1]} (images/s ratios):")
        out.append(table([header[i] for i in keep], [[cells[i] for i in keep] for cells in body]))
    header, body = train_table(rows)
    if body:
        out.append("training step:")
        keep = [
            header.index(h)
            for h in (
                "size",
                "dtype",
                "layout",
                "backend",
                "ms/step",
                "vs eager",
                "peak MiB",
                "peak vs eager",
            )
        ]
        out.append(table([header[i] for i in keep], [[cells[i] for i in keep] for cells in body]))
    header, body = memory_table(rows)
    if body:
        out.append("saved for backward:")
        out.append(table(header[:5], [cells[:5] for cells in body]))
    header, body = operator_summary(rows)
    if body:
        out.append("operator (geomean speed-up vs eager over convs):")
        keep = [
            header.index(h)
            for h in ("size", "backend", "dtype", "layout", "pass", "convs", "geomean vs eager")
        ]
        out.append(table([header[i] for i in keep], [[cells[i] for i in keep] for cells in body]))
    if not rows:
        out.append("no benchmark rows were produced")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", action="append", default=[], help="JSON-lines rows file (repeatable)")
    parser.add_argument("--json", action="append", default=[], help="pytest-benchmark JSON file (repeatable)")
    parser.add_argument("--steps", default=None, help="step log of gpu_check.sh (tab-separated)")
    parser.add_argument("--out", default=None, help="write the full markdown report here")
    args = parser.parse_args(argv)
    rows = load_rows(args.rows, args.json)
    steps = load_steps(args.steps)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(full_report(rows, steps))
    print(short_table(rows, steps))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
