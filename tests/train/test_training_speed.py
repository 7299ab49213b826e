"""The training job's speed settings on the CPU: --amp, channels_last, --compile, --workers, img/s."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unetpp_fast import cli
from unetpp_fast.train import training
from unetpp_fast.train.synthetic_data import write_synthetic_dataset


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("speed") / "synthetic"
    write_synthetic_dataset(str(root), n=10, size=32, seed=1)
    return str(root)


def _run(root: str, out: Path, log=None, **kw) -> training.TrainResult:
    settings = dict(
        data=root,
        out_dir=str(out),
        filters=(4, 8, 16),
        size=32,
        epochs=1,
        batch_size=4,
        lr=1e-3,
        device="cpu",
        progress=False,
        val_fraction=0.2,
    )
    settings.update(kw)
    return training.train(training.TrainConfig(**settings), log=log or (lambda message: None))


def _steps(result: training.TrainResult) -> list[float]:
    return result.history[0]["step_losses"]


def test_bf16_autocast_trains_on_the_cpu(synthetic, tmp_path):
    full = _run(synthetic, tmp_path / "fp32")
    bf16 = _run(synthetic, tmp_path / "bf16", amp="bf16")
    # bf16 rounding moves the loss a little (so autocast was on), not much
    assert _steps(bf16) != _steps(full)
    assert _steps(bf16) == pytest.approx(_steps(full), abs=3e-2)
    assert training.read_checkpoint(bf16.last_path)["config"]["amp"] == "bf16"
    assert training.amp_dtype("bf16") is torch.bfloat16 and training.amp_dtype("off") is None


def test_fp16_on_the_cpu_is_refused_in_one_line(synthetic, tmp_path, capsys):
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA GPU"):
        _run(synthetic, tmp_path / "fp16", amp="fp16")
    argv = ["train", "--data", synthetic, "--out", str(tmp_path / "cli"), "--amp", "fp16", "--device", "cpu"]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--amp fp16 needs a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "cli").exists()  # refused before a run folder is made
    with pytest.raises(ValueError, match="amp must be one of"):
        training.TrainConfig(data="x", amp="fp8")


def test_channels_last_inputs_and_weights(synthetic, tmp_path, monkeypatch):
    seen = []
    build = training.build_model

    def spying_build(spec):
        model = build(spec)

        def record(module, args):
            if module.training:
                x = args[0]
                weight = module.conv0_0.conv1.weight
                seen.append(
                    (
                        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                        weight.is_contiguous(memory_format=torch.channels_last)
                        and not weight.is_contiguous(),
                    )
                )

        model.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(training, "build_model", spying_build)
    default = _run(synthetic, tmp_path / "nchw")
    assert seen and not any(a or b for a, b in seen)  # the CPU default is NCHW
    seen.clear()
    last = _run(synthetic, tmp_path / "cl", channels_last=True)
    assert seen and all(a and b for a, b in seen)
    assert _steps(last) == pytest.approx(_steps(default), rel=1e-4)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    config = training.TrainConfig(data="x")
    assert training.use_channels_last(config, cuda) and not training.use_channels_last(config, cpu)
    off = training.TrainConfig(data="x", channels_last=False)
    assert not training.use_channels_last(off, cuda)


def test_compile_runs_the_fused_model_through_dynamo(synthetic, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _run(synthetic, tmp_path / "eager")
    assert not counters["stats"]["unique_graphs"]
    # aot_eager traces forward and backward through the op's fake implementation without the
    # minutes of C++ compilation inductor needs on a 2-core CPU; the CLI's --compile uses inductor.
    compiled = _run(synthetic, tmp_path / "compiled", compile=True, compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1
    assert _steps(compiled) == pytest.approx(_steps(eager), rel=1e-4)
    torch._dynamo.reset()


def test_workers_give_the_same_batches(synthetic, tmp_path, monkeypatch):
    from unetpp_fast.train import data

    loaders = []
    make = data.train_loader

    def spying_loader(*args, **kw):
        loaders.append(make(*args, **kw))
        return loaders[-1]

    monkeypatch.setattr(data, "train_loader", spying_loader)
    inline = _run(synthetic, tmp_path / "w0", epochs=2)
    workers = _run(synthetic, tmp_path / "w2", epochs=2, workers=2)
    assert [loader.num_workers for loader in loaders] == [0, 2]
    assert not any(loader.pin_memory for loader in loaders)  # pinned memory only feeds a GPU
    for a, b in zip(inline.history, workers.history):
        assert b["step_losses"] == pytest.approx(a["step_losses"], rel=1e-6)
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        training.TrainConfig(data="x", workers=-1)


def test_throughput_in_the_epoch_log_and_history(synthetic, tmp_path, capsys):
    lines: list[str] = []
    result = _run(synthetic, tmp_path / "log", log=lines.append)
    record = result.history[0]
    assert record["images_per_s"] > 0 and record["processes"] == 1
    assert "peak_gpu_mib" not in record  # only measured on CUDA
    epoch_line = next(line for line in lines if line.startswith("epoch 1/1"))
    assert f"{record['images_per_s']:.1f} img/s" in epoch_line
    _run(synthetic, tmp_path / "bar", progress=True)  # the bar (on a terminal) shows them too
    bar = capsys.readouterr().err
    assert "img/s=" in bar and "loss=" in bar
    text = training.speed_text({"images_per_s": 812.25, "peak_gpu_mib": 1234.4})
    assert text == "812.2 img/s, peak GPU 1,234 MiB"


def test_resume_takes_the_speed_settings_from_the_command_line(synthetic, tmp_path):
    _run(synthetic, tmp_path / "run", amp="bf16")
    config = training.TrainConfig(data="", epochs=2, device="cpu", progress=False, amp="off", workers=1)
    training.train(config, resume=str(tmp_path / "run"), log=lambda message: None)
    payload = training.read_checkpoint(str(tmp_path / "run" / training.LAST_NAME))
    assert payload["epoch"] == 2 and payload["config"]["filters"] == [4, 8, 16]  # the model: the checkpoint's
    assert payload["config"]["amp"] == "off" and payload["config"]["workers"] == 1  # how it runs: this call's


def test_cli_speed_options(synthetic, tmp_path, capsys):
    argv = [
        "train",
        "--data",
        synthetic,
        "--out",
        str(tmp_path / "cli"),
        "--filters",
        "4,8,16",
        "--size",
        "32",
    ]
    argv += ["--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress", "--threads", "1"]
    argv += ["--amp", "bf16", "--channels-last", "--workers", "1", "--sync-bn"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "amp bf16, channels_last, 1 data worker" in out
    assert "img/s" in out and "--sync-bn has no effect in a single process" in out
    config = training.read_checkpoint(str(tmp_path / "cli" / training.LAST_NAME))["config"]
    assert config["amp"] == "bf16" and config["channels_last"] is True and config["workers"] == 1
