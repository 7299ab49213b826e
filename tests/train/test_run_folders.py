"""Run folders never lose work: resume stays in its folder, other runs are refused, saves are atomic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from unetpp_fast.train import training
from unetpp_fast.train.synthetic_data import write_synthetic_dataset


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(data_root: str, out_dir: Path | str, **kw) -> training.TrainConfig:
    defaults = dict(
        data=data_root,
        out_dir=str(out_dir),
        filters=(4, 8, 16),
        size=32,
        epochs=1,
        batch_size=4,
        lr=1e-3,
        device="cpu",
        progress=False,
        val_fraction=0.25,
    )
    defaults.update(kw)
    return training.TrainConfig(**defaults)


@pytest.fixture
def data_root(tmp_path: Path) -> str:
    root = tmp_path / "synthetic"
    write_synthetic_dataset(str(root), n=8, size=32, seed=1)
    return str(root)


def test_resume_continues_in_the_runs_own_folder(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default runs/unetpp would appear
    run = tmp_path / "my-run"
    training.train(_config(data_root, run), log=_quiet)
    result = training.train(_config("", "", epochs=2), resume=str(run / training.LAST_NAME), log=_quiet)
    assert Path(result.last_path).parent.resolve() == run.resolve()
    assert training.read_checkpoint(str(run / training.LAST_NAME))["epoch"] == 2
    assert not (tmp_path / "runs").exists()
    # a run folder given as --resume continues from its last.pth, not its best.pth
    training.train(_config("", "", epochs=3), resume=str(run), log=_quiet)
    assert training.read_checkpoint(str(run / training.LAST_NAME))["epoch"] == 3


def test_an_existing_run_is_refused_without_overwrite(tmp_path, data_root):
    run = tmp_path / "run"
    training.train(_config(data_root, run), log=_quiet)
    before = {name: (run / name).read_bytes() for name in ("best.pth", "last.pth", "history.json")}
    with pytest.raises(training.RunExistsError, match="already holds a training run.*--overwrite"):
        training.train(_config(data_root, run, seed=3), log=_quiet)
    assert {name: (run / name).read_bytes() for name in before} == before
    # a resumed run may not take over another run's folder either
    other = tmp_path / "other"
    training.train(_config(data_root, other), log=_quiet)
    with pytest.raises(training.RunExistsError):
        training.train(_config("", other, epochs=2), resume=str(run), log=_quiet)
    # --overwrite moves the old run aside instead of deleting it
    training.train(_config(data_root, run, seed=3), log=_quiet, overwrite=True)
    (archive,) = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert {name: (archive / name).read_bytes() for name in before} == before
    assert (run / "best.pth").read_bytes() != before["best.pth"]


def test_a_better_best_of_another_run_is_never_replaced(tmp_path):
    path = str(tmp_path / "best.pth")
    theirs = {"format": training.CHECKPOINT_FORMAT, "version": 1, "run_id": "theirs", "best_iou": 0.444}
    training.save_checkpoint_atomic(path, theirs)
    ours = dict(theirs, run_id="ours", best_iou=0.209)
    messages: list[str] = []
    assert not training._save_best(path, ours, messages.append)
    assert training.read_checkpoint(path)["run_id"] == "theirs" and "better model" in messages[0]
    assert training._save_best(path, dict(ours, best_iou=0.5), messages.append)
    assert training.read_checkpoint(path)["run_id"] == "ours"


SAVER = textwrap.dedent(
    """
    import sys, torch
    from unetpp_fast.train.training import save_checkpoint_atomic
    path, i = sys.argv[1], 0
    big = torch.empty(24 * 2**20 // 4)  # 24 MiB: a save takes long enough to be killed inside it
    while True:
        i += 1
        save_checkpoint_atomic(path, {"step": i, "weights": big.fill_(float(i))})
    """
)


def test_a_kill_during_a_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pth"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        temporaries: list[str] = []
        # Wait for a complete checkpoint, then for the next save to be under way, and kill it there.
        while time.monotonic() < deadline and proc.poll() is None:
            temporaries = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
            if path.exists() and temporaries and os.path.getsize(tmp_path / temporaries[0]) > 0:
                break
            time.sleep(0.001)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert temporaries, "the saver was never caught in the middle of a save"
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))  # killed mid-save: the partial file
    payload = torch.load(path, weights_only=True)
    assert payload["step"] >= 1 and bool((payload["weights"] == float(payload["step"])).all())
    training._remove_stale_temporaries(str(tmp_path))  # what the next run in this folder does first
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


def test_ctrl_c_names_the_checkpoint_and_history_is_kept_per_epoch(tmp_path, data_root, monkeypatch):
    run = tmp_path / "run"
    real_epoch = training._Steps.epoch

    def interrupted_in_epoch_2(*args, **kwargs):
        if args[-1] == 1:  # the epoch index
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training._Steps, "epoch", interrupted_in_epoch_2)
    with pytest.raises(training.TrainingInterrupted) as info:
        training.train(_config(data_root, run, epochs=3), log=_quiet)
    assert info.value.last_path == str(run / training.LAST_NAME) and info.value.epochs_done == 1
    # history.json and history.png are written after every epoch, not only at the end
    assert len(training.json.loads((run / training.HISTORY_NAME).read_text())) == 1
    assert (run / training.HISTORY_PLOT_NAME).read_bytes()[:4] == b"\x89PNG"


def test_overwriting_twice_in_one_second_keeps_both_old_runs(tmp_path):
    for content in ("first run", "second run"):
        (tmp_path / training.HISTORY_NAME).write_text(content)
        training.prepare_run_folder(str(tmp_path), None, overwrite=True, log=_quiet)
    archives = sorted(p for p in tmp_path.iterdir() if p.name.startswith("replaced-"))
    kept = sorted((a / training.HISTORY_NAME).read_text() for a in archives)
    assert kept == ["first run", "second run"]
