"""unetpp_fast.checkpoint: safe loading, wrapper unwrapping, readable mismatch errors."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from unetpp_fast import load_checkpoint
from unetpp_fast.compat import BasicUNetPlusPlus
from unetpp_fast.compat.checkpoint import (
    StateDictMismatchError,
    UnreadableCheckpointError,
    extract_state_dict,
)

SMALL = (4, 4, 8, 8, 8, 4)


def _model(seed: int, **kwargs) -> BasicUNetPlusPlus:
    torch.manual_seed(seed)
    return BasicUNetPlusPlus(spatial_dims=2, features=SMALL, **kwargs)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"model_state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
        lambda sd: {"checkpoint": 1, "net": {"state_dict": sd}},
    ],
    ids=["plain", "state_dict+module", "model", "ddp+compile", "nested"],
)
def test_loads_files_in_common_wrappers(tmp_path, wrap):
    source, target = _model(0), _model(1)
    assert not _same(source, target)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict()), path)
    report = load_checkpoint(target, path)
    assert _same(source, target)
    assert not report.missing and not report.unexpected


def test_loads_from_a_file_object_and_a_dict():
    source, target = _model(0), _model(1)
    buffer = io.BytesIO()
    torch.save({"state_dict": source.state_dict()}, buffer)
    buffer.seek(0)
    load_checkpoint(target, buffer)
    assert _same(source, target)
    load_checkpoint(target, {"model": _model(2).state_dict()})
    assert _same(_model(2), target)


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {}


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(_model(0), path)
    assert not _Payload.ran


def test_mismatch_lists_missing_unexpected_and_shapes_and_changes_nothing():
    target = _model(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = _model(0, out_channels=3).state_dict()  # heads of another shape
    del state["conv_0_0.conv_0.conv.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(target, state)
    message = str(info.value)
    assert "missing keys (in the model, not in the state_dict) (1):\n    conv_0_0.conv_0.conv.bias" in message
    assert "unexpected keys (in the state_dict, not in the model) (1):\n    extra.weight" in message
    assert "shape mismatches (8):" in message
    assert "final_conv_0_1.weight: state_dict [3, 4, 1, 1] vs model [2, 4, 1, 1]" in message
    assert info.value.report.missing == ["conv_0_0.conv_0.conv.bias"]
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_non_strict_reports_and_loads_the_rest_but_never_wrong_shapes():
    source, target = _model(0), _model(1)
    state = source.state_dict()
    del state["final_conv_0_4.bias"]
    report = load_checkpoint(target, state, strict=False)
    assert report.missing == ["final_conv_0_4.bias"]
    assert torch.equal(target.final_conv_0_4.weight, source.final_conv_0_4.weight)
    state["final_conv_0_4.weight"] = torch.zeros(5, 4, 1, 1)
    with pytest.raises(StateDictMismatchError, match="shape mismatches"):
        load_checkpoint(target, state, strict=False)


def test_model_load_state_dict_is_readable_too_and_hints_at_prefixes():
    target = _model(1)
    prefixed = {f"model.{k}": v for k, v in _model(0).state_dict().items()}
    with pytest.raises(StateDictMismatchError) as info:
        target.load_state_dict(prefixed)
    message = str(info.value)
    assert "does not match BasicUNetPlusPlus" in message
    assert "... and" in message  # long lists are shortened
    assert "prefix 'model.'" in message


def test_extract_errors_name_what_was_found():
    with pytest.raises(ValueError, match="no state_dict found.*'epoch'"):
        extract_state_dict({"epoch": 3, "optimizer": {"lr": 1.0}})
    with pytest.raises(TypeError, match="list"):
        extract_state_dict([1, 2])


# --- issue 13, item 10: unreadable files are named ------------------------------------------------


def _truncations(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(_model(0).state_dict(), good)
    data = good.read_bytes()
    cases = {"empty": b"", "first byte": data[:1], "half": data[: len(data) // 2], "tail cut": data[:-30]}
    cases["text"] = b"this is not a checkpoint\n"
    return cases


@pytest.mark.parametrize("case", ["empty", "first byte", "half", "tail cut", "text"])
def test_unreadable_file_is_named(tmp_path, case):
    path = tmp_path / f"{case.replace(' ', '_')}.pth"
    path.write_bytes(_truncations(tmp_path)[case])
    model = _model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        UnreadableCheckpointError, match=rf"{path.name} \(\d+ bytes\) is not a readable checkpoint"
    ):
        load_checkpoint(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unreadable_file_object_is_named(tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(_truncations(tmp_path)["half"])
    with open(path, "rb") as f, pytest.raises(ValueError, match=r"cut\.pth is not a readable checkpoint"):
        load_checkpoint(_model(1), f)


def test_missing_file_keeps_its_own_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_checkpoint(_model(1), tmp_path / "nothere.pth")
