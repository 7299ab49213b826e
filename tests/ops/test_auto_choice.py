"""`auto` chooses by measurement (issue 11, item 5): the choice is recorded and persisted, a second
process reads it without measuring, a forced backend wins, training never picks the reference, a
backend that disagrees with the reference is dropped, and the fixed order holds where nothing may
be measured (torch.compile, `UNETPP_FAST_AUTO=order`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import unetpp_fast
from unetpp_fast.ops import backend_choice, backends
from unetpp_fast.ops.backends import BackendImpl


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    """An empty cache dir and no choices in this process; measuring on."""
    monkeypatch.setenv("UNETPP_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(backend_choice.AUTO_MODE_ENV, raising=False)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backend_choice.forget()
    yield tmp_path
    backend_choice.forget()


@pytest.fixture
def measured(monkeypatch):
    """The candidate lists `measure` is called with, in order."""
    calls: list[list[str]] = []
    original = backend_choice.measure

    def spy(candidates, *args):
        calls.append(list(candidates))
        return original(candidates, *args)

    monkeypatch.setattr(backend_choice, "measure", spy)
    return calls


def _call(seed: int = 0, batch: int = 1, requires_grad: bool = False, size: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen).requires_grad_(requires_grad)
    low = torch.randn(batch, 2, size // 2, size // 2, generator=gen)
    w = torch.randn(4, 5, 3, 3, generator=gen).requires_grad_(requires_grad)
    b = torch.randn(4, generator=gen)
    return [x, low], w, b, ["none", "up_bilinear"]


def _usable_on_cpu() -> list[str]:
    return [n for n in backends.auto_order("cpu") if not backends.why_unusable(n, "cpu")]


def test_inference_choice_is_measured_once_recorded_and_persisted(fresh_choices, measured):
    if len(_usable_on_cpu()) < 2:
        pytest.skip("one backend on CPU here: nothing to measure")
    pieces, w, b, modes = _call(batch=3)
    with torch.no_grad(), backends.count_calls() as ran:
        out = unetpp_fast.fused_conv(pieces, w, b, modes)
        unetpp_fast.fused_conv(_call(seed=1, batch=4)[0], w, b, modes)  # same bucket: 192, 256 -> 256
    assert measured == [_usable_on_cpu()]  # inference: the reference competes too
    (name,) = ran  # both calls ran on the one chosen backend
    assert ran[name] == 2 and name in _usable_on_cpu()
    with backends.use_backend("reference"), torch.no_grad():
        assert rel_err(out, unetpp_fast.fused_conv(pieces, w, b, modes)) < 1e-5
    saved = json.loads((fresh_choices / backend_choice.CHOICE_FILE).read_text())
    (section,) = saved.values()
    assert list(section.values()) == [name]


def test_a_second_process_reads_the_choice_without_measuring(fresh_choices):
    if len(_usable_on_cpu()) < 2:
        pytest.skip("one backend on CPU here: nothing to measure")
    script = textwrap.dedent(
        """
        import json, torch, unetpp_fast
        from unetpp_fast.ops import backend_choice, backends
        seen = []
        original = backend_choice.measure
        backend_choice.measure = lambda *a: seen.append(1) or original(*a)
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
        with torch.no_grad(), backends.count_calls() as ran:
            unetpp_fast.fused_conv([x], w)
        print(json.dumps({"measured": len(seen), "ran": dict(ran)}))
        """
    )
    env = {**os.environ, "UNETPP_FAST_CACHE_DIR": str(fresh_choices)}
    env.pop(backend_choice.AUTO_MODE_ENV, None)
    env.pop(backends.ENV_VAR, None)
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            cwd=fresh_choices,  # not the checkout: its bare source folder would shadow the installed package
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["measured"] == 1 and runs[1]["measured"] == 0
    assert runs[0]["ran"] == runs[1]["ran"]  # the second process runs what the first one chose


def test_forced_backend_wins_over_the_measured_choice(fresh_choices, measured, monkeypatch):
    pieces, w, b, modes = _call()
    with torch.no_grad(), backends.count_calls() as ran:
        unetpp_fast.fused_conv(pieces, w, b, modes, backend="reference")
        with backends.use_backend("reference"):
            unetpp_fast.fused_conv(pieces, w, b, modes)
        monkeypatch.setenv(backends.ENV_VAR, "reference")
        unetpp_fast.fused_conv(pieces, w, b, modes)
    assert ran == {"reference": 3} and measured == []


def test_training_never_picks_the_reference(fresh_choices, measured):
    if "cpu" not in _usable_on_cpu():
        pytest.skip("no C++ backend here")
    pieces, w, b, modes = _call(requires_grad=True)
    with backends.count_calls() as ran:
        out = unetpp_fast.fused_conv(pieces, w, b, modes)
    out.sum().backward()
    assert ran == {"cpu": 1}  # on CPU the one fused backend: decided without timing
    assert measured == []
    assert backend_choice.candidates(torch.device("cpu"), torch.float32, 2, 2, training=True) == ["cpu"]


def test_a_candidate_that_disagrees_is_dropped_with_a_warning(fresh_choices, measured):
    if "cpu" not in _usable_on_cpu():
        pytest.skip("no C++ backend here")
    saved = backends.registered("cpu")
    real = saved[1]()

    def wrong_forward(pieces, codes, weight, bias, activation):
        return real.forward(pieces, codes, weight, bias, activation) + 1.0

    try:
        backends.register_backend(
            "cpu", saved[0], lambda: BackendImpl(wrong_forward, real.backward), saved[2]
        )
        pieces, w, b, modes = _call()
        with (
            torch.no_grad(),
            backends.count_calls() as ran,
            pytest.warns(UserWarning, match="'cpu' disagrees"),
        ):
            out = unetpp_fast.fused_conv(pieces, w, b, modes)
    finally:
        backends.register_backend("cpu", *saved)
    assert ran == {"reference": 1}
    with backends.use_backend("reference"), torch.no_grad():
        assert rel_err(out, unetpp_fast.fused_conv(pieces, w, b, modes)) < 1e-6
    # Registering the real backend again voided this process's choice; with the file gone too, the
    # kind is measured again.
    (fresh_choices / backend_choice.CHOICE_FILE).unlink()
    with torch.no_grad():
        unetpp_fast.fused_conv(pieces, w, b, modes)
    assert len(measured) == 2


def test_order_mode_and_compile_do_not_measure(fresh_choices, measured, monkeypatch):
    pieces, w, b, modes = _call()
    monkeypatch.setenv(backend_choice.AUTO_MODE_ENV, "order")
    with torch.no_grad(), backends.count_calls() as ran:
        unetpp_fast.fused_conv(pieces, w, b, modes)
    assert ran == {backends.resolve_name("cpu"): 1} and measured == []
    monkeypatch.setenv(backend_choice.AUTO_MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="UNETPP_FAST_AUTO must be 'measure' or 'order'"):
        unetpp_fast.fused_conv(pieces, w, b, modes)
    monkeypatch.delenv(backend_choice.AUTO_MODE_ENV)
    compiled = torch.compile(
        lambda p, w, b: unetpp_fast.fused_conv(p, w, b, modes), backend="eager", fullgraph=True
    )
    with torch.no_grad():
        compiled(pieces, w, b)
    assert measured == []
    assert not (fresh_choices / backend_choice.CHOICE_FILE).exists()


def test_capture_uses_the_fixed_order_without_measuring(fresh_choices, measured, monkeypatch):
    monkeypatch.setattr(backend_choice, "_capturing", lambda device: True)  # no CUDA here: the rule
    pieces, w, b, modes = _call()
    with torch.no_grad(), backends.count_calls() as ran:
        unetpp_fast.fused_conv(pieces, w, b, modes)
    assert ran == {backends.resolve_name("cpu"): 1} and measured == []
    assert not (fresh_choices / backend_choice.CHOICE_FILE).exists()


def test_a_read_only_cache_dir_just_means_measuring(tmp_path, monkeypatch, measured):
    if len(_usable_on_cpu()) < 2:
        pytest.skip("one backend on CPU here: nothing to measure")
    target = tmp_path / "not_a_dir"
    target.write_text("a file where the cache dir should be")
    monkeypatch.setenv("UNETPP_FAST_CACHE_DIR", str(target))
    backend_choice.forget()
    try:
        pieces, w, b, modes = _call()
        with torch.no_grad():
            unetpp_fast.fused_conv(pieces, w, b, modes)
        assert len(measured) == 1
    finally:
        backend_choice.forget()


def test_fp32_agreement_allows_tf32_on_gpus_only_when_tf32_is_on():
    """cuDNN rounds the reference's fp32 convolutions to TF32 by default (about 5e-4 from exact):
    an exact or TF32 candidate must not be dropped for that; elsewhere fp32 stays strict."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32  # properties of torch's flag modules: set, then restore
    try:
        cudnn.allow_tf32, matmul.allow_tf32 = True, False
        tf32 = backend_choice.agreement_tolerance(torch.float32, "cuda")
        assert 1e-3 < tf32 < backend_choice.agreement_tolerance(torch.bfloat16, "cuda")
        assert backend_choice.agreement_tolerance(torch.float32, "cpu") == 1e-4
        cudnn.allow_tf32 = False
        assert backend_choice.agreement_tolerance(torch.float32, "cuda") == 1e-4
        matmul.allow_tf32 = True  # our kernels' switch
        assert backend_choice.agreement_tolerance(torch.float32, "cuda") == tf32
        assert backend_choice.agreement_tolerance(torch.float16, "cuda") == 2e-2
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_size_bucket_is_the_power_of_two_above():
    assert [backend_choice.size_bucket(n) for n in (1, 2, 3, 64, 65, 128)] == [1, 2, 4, 64, 128, 128]


def test_a_fused_backend_replaces_the_reference_only_when_clearly_faster():
    assert backend_choice._fastest({"cpu": 0.98, "reference": 1.0}) == "reference"  # a near tie
    assert backend_choice._fastest({"cpu": 0.92, "reference": 1.0}) == "reference"  # within the margin
    assert backend_choice._fastest({"cpu": 0.85, "reference": 1.0}) == "cpu"
    assert backend_choice._fastest({"cuda": 1.0, "triton": 0.99}) == "triton"  # training: no margin
    assert backend_choice._fastest({}) is None


def test_a_job_header_says_what_auto_will_do(monkeypatch):
    usable = _usable_on_cpu()
    monkeypatch.delenv(backend_choice.AUTO_MODE_ENV, raising=False)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    inference = backend_choice.describe("cpu", training=False)
    training = backend_choice.describe("cpu", training=True)
    if len(usable) > 1:
        assert inference == f"auto (measured per kind of convolution: {', '.join(usable)})"
    fused = [n for n in usable if n != "reference"] or usable[:1]
    assert training == (
        f"{fused[0]} (auto)"
        if len(fused) == 1
        else f"auto (measured per kind of convolution: {', '.join(fused)})"
    )
    with backends.use_backend("reference"):
        assert backend_choice.describe("cpu", training=True) == "reference"
    monkeypatch.setenv(backend_choice.AUTO_MODE_ENV, "order")
    assert backend_choice.describe("cpu", training=False) == f"{usable[0]} (auto, fixed order)"


def _fake_backend(name: str, forward_delay: float = 0.0, backward_delay: float = 0.0, wrong_grad=False):
    """Register `name` as a CPU backend wrapping the reference one, slowed or wrong on purpose."""
    import time

    real = backends.get_impl("reference")

    def forward(pieces, codes, weight, bias, activation):
        time.sleep(forward_delay)
        return real.forward(pieces, codes, weight, bias, activation)

    def backward(grad_out, pieces, codes, weight, out, has_bias, activation):
        time.sleep(backward_delay)
        grads = real.backward(grad_out, pieces, codes, weight, out, has_bias, activation)
        return [grads[0] * 2, *grads[1:]] if wrong_grad else grads

    caps = backends.Capabilities(dtypes=(torch.float32, torch.float64), spatial_dims=(2, 3))
    backends.register_backend(name, lambda device: "", lambda: BackendImpl(forward, backward), caps)


@pytest.fixture
def restore_gpu_backends():
    saved = {name: backends.registered(name) for name in ("cuda", "triton")}
    yield
    for name, entry in saved.items():
        backends.register_backend(name, *entry)


def test_training_choice_times_the_backward_too(restore_gpu_backends):
    # 'triton' has the faster forward but a slow backward: inference picks it, training does not
    _fake_backend("triton", backward_delay=0.2)
    _fake_backend("cuda", forward_delay=0.02)
    pieces, w, b, _ = _call()
    codes = [0, 3]
    best, seconds = backend_choice.measure(["cuda", "triton"], pieces, codes, w, b, "relu")
    assert best == "triton" and seconds["triton"] < seconds["cuda"]
    best, seconds = backend_choice.measure(["cuda", "triton"], pieces, codes, w, b, "relu", True)
    assert best == "cuda" and seconds["triton"] >= 0.2 and seconds["cuda"] < seconds["triton"]


def test_training_drops_a_backend_whose_gradients_disagree(restore_gpu_backends):
    _fake_backend("triton", wrong_grad=True)
    _fake_backend("cuda", forward_delay=0.01)
    pieces, w, b, _ = _call()
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="'triton' disagrees"):
        best, seconds = backend_choice.measure(["cuda", "triton"], pieces, [0, 3], w, b, "relu", True)
    assert best == "cuda" and set(seconds) == {"cuda"}
    assert torch.equal(torch.random.get_rng_state(), state)  # measuring left the caller's RNG alone
    # inference: the forward agrees, so it stays a candidate
    best, seconds = backend_choice.measure(["cuda", "triton"], pieces, [0, 3], w, b, "relu")
    assert set(seconds) == {"cuda", "triton"}


def test_a_reference_out_of_memory_leaves_the_fixed_order(fresh_choices, monkeypatch):
    # The reference materialises the input the fused backends avoid: on a full GPU it may not fit.
    saved = backends.registered("reference")
    real = saved[1]()

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    try:
        backends.register_backend(
            "reference", saved[0], lambda: BackendImpl(out_of_memory, real.backward), saved[2]
        )
        pieces, w, b, _ = _call()
        with pytest.raises(backend_choice.CannotMeasure, match="not enough memory"):
            backend_choice.measure(["cpu"], pieces, [0, 3], w, b, "relu", True)
    finally:
        backends.register_backend("reference", *saved)
    if len(_usable_on_cpu()) < 2:
        return

    def cannot(*args):
        raise backend_choice.CannotMeasure("not enough memory to check the call against the reference")

    monkeypatch.setattr(backend_choice, "measure", cannot)
    pieces, w, b, modes = _call(seed=5)
    with (
        torch.no_grad(),
        pytest.warns(UserWarning, match="the fixed order decides"),
        backends.count_calls() as ran,
    ):
        unetpp_fast.fused_conv(pieces, w, b, modes)
    assert ran == {_usable_on_cpu()[0]: 1}
    assert not (fresh_choices / backend_choice.CHOICE_FILE).exists()  # nothing measured: nothing written
