"""The benchmark's interleaved timing: every backend's rounds alternate, failures stay local."""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.bench import timing
from unetpp_fast.ops import fused_conv


def _recording_run(backend: str, log: list[str], batch: int = 2) -> timing.TimedRun:
    def step() -> None:
        log.append(backend)

    return timing.TimedRun(backend, step, batch=batch, size=8)


def test_rounds_alternate_and_the_first_backend_rotates() -> None:
    log: list[str] = []
    runs = [_recording_run(b, log) for b in (timing.FUSED, timing.EAGER, "reference")]
    results = timing.interleaved_timing(runs, "cpu", rounds=4)
    assert log == [
        "fused", "eager", "reference",
        "eager", "reference", "fused",
        "reference", "fused", "eager",
        "fused", "eager", "reference",
    ]  # fmt: skip
    for backend, result in results.items():
        assert isinstance(result, timing.Throughput), backend
        assert result.timing.rounds == 4 and len(result.timing.samples_s) == 4
        assert result.images_per_s == pytest.approx(2 / result.median_s_per_batch)


def test_each_call_runs_inside_its_own_backend() -> None:
    seen: dict[str, list[object]] = {}
    from unetpp_fast.ops import fused_op

    def probe(name: str) -> timing.TimedRun:
        def step() -> None:
            # 'eager' swaps the package's fused_conv for plain PyTorch; the others keep the operator
            seen.setdefault(name, []).append(fused_op.fused_conv)

        return timing.TimedRun(name, step, batch=1, size=8)

    timing.interleaved_timing([probe(timing.EAGER), probe(timing.FUSED)], "cpu", rounds=3)
    assert all(f is timing.plain_fused_conv for f in seen[timing.EAGER])
    assert all(f is fused_conv for f in seen[timing.FUSED])


def test_a_failing_backend_is_reported_and_the_others_finish() -> None:
    log: list[str] = []
    calls = {"n": 0}

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory on round 2")

    runs = [timing.TimedRun("reference", flaky, 1, 8), _recording_run(timing.EAGER, log)]
    results = timing.interleaved_timing(runs, "cpu", rounds=5)
    assert isinstance(results["reference"], RuntimeError)
    assert calls["n"] == 2  # dropped after it failed
    assert log == [timing.EAGER] * 5
    assert isinstance(results[timing.EAGER], timing.Throughput)


def test_counts_the_fused_calls_of_the_timed_rounds_only() -> None:
    from unetpp_fast.ops import fused_op

    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)

    def two_convs() -> None:  # looked up at call time, as the package's modules do
        fused_op.fused_conv([x], w)
        fused_op.fused_conv([x], w)

    fused = timing.TimedRun("reference", two_convs, 1, 6)
    plain = timing.TimedRun(timing.EAGER, two_convs, 1, 6)
    results = timing.interleaved_timing([fused, plain], "cpu", rounds=3)
    assert results["reference"].backend_calls == {"reference": 2.0}
    assert results[timing.EAGER].backend_calls == {}  # plain PyTorch: no fused call ran


def test_bad_arguments_are_refused() -> None:
    log: list[str] = []
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved_timing([_recording_run("eager", log)], "cpu", rounds=0)
    with pytest.raises(ValueError, match="distinct backends"):
        timing.interleaved_timing([_recording_run("eager", log), _recording_run("eager", log)], "cpu", 2)


def test_pruning_rows_time_every_backend_of_a_model_together() -> None:
    rows = timing.pruning_throughput(
        batch=1,
        size=16,
        backends_to_run=(timing.FUSED, timing.EAGER),
        levels=(2,),
        include_unet=False,
        include_wide_unet=False,
        warmup=1,
        rounds=2,
        filters=(4, 8, 16, 32, 64),
    )
    assert [(r["model"], r["backend"]) for r in rows] == [("UNet++ L2", "fused"), ("UNet++ L2", "eager")]
    fused, eager = rows
    assert fused["error"] is None and eager["error"] is None
    assert sum(fused["backend_calls"].values()) == 13  # L2's convolutions, each a fused call
    assert eager["backend_calls"] == {} and eager["ratio_vs_eager"] == 1.0
    assert fused["ratio_vs_eager"] > 0


def _throughput(samples: list[float], batch: int = 4) -> timing.Throughput:
    stats = timing.TimingStats(
        median_s=sorted(samples)[len(samples) // 2],
        mean_s=sum(samples) / len(samples),
        min_s=min(samples),
        max_s=max(samples),
        stdev_s=0.0,
        rounds=len(samples),
        device="cpu",
        samples_s=tuple(samples),
    )
    return timing.Throughput(batch / stats.median_s, stats.median_s, batch, 8, stats)


def test_speed_up_is_the_median_of_the_per_round_ratios():
    # round 1 ran on a quiet machine, rounds 2-3 in a slow spell that hit both backends alike
    fused = _throughput([1.0, 3.0, 3.2])
    eager = _throughput([1.1, 3.3, 3.52])
    assert timing.paired_speedup(fused, eager) == pytest.approx(1.1)
    assert timing.paired_speedup(eager, eager) == 1.0
    # not paired (a backend that stopped early): the ratio of the median times
    partial = _throughput([2.0, 4.0])
    assert timing.paired_speedup(partial, eager) == pytest.approx(
        eager.median_s_per_batch / partial.median_s_per_batch
    )
