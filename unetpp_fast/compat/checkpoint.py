"""Loading checkpoints into the models: safe `torch.load`, common wrappers, readable mismatch errors.

    load_checkpoint(model, "run/best.pth")       # a file, a file object, or a dict already loaded

* files are read with `torch.load(..., weights_only=True)` (no arbitrary code from pickles);
* the state_dict is found inside the usual wrappers ({'state_dict': ...}, {'model': ...},
  {'model_state_dict': ...}, {'net': ...}, nested);
* prefixes added by `nn.DataParallel` / DistributedDataParallel ('module.') and by `torch.compile`
  ('_orig_mod.') are removed when the model's own keys do not carry them;
* a mismatch raises `StateDictMismatchError` listing missing keys, unexpected keys and shape
  mismatches, one per line, before any parameter is changed.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 20
# BatchNorm fills a missing counter itself when loading state_dicts from before it existed.
_TOLERATED_MISSING_SUFFIXES = ("num_batches_tracked",)


@dataclass
class StateDictReport:
    """What differs between a state_dict and a model."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def problems(self, strict: bool) -> bool:
        return bool(self.mismatched) or (strict and bool(self.missing or self.unexpected))


def _listing(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    shown = lines[:_MAX_LISTED]
    out = [f"  {title} ({len(lines)}):"] + [f"    {line}" for line in shown]
    if len(lines) > len(shown):
        out.append(f"    ... and {len(lines) - len(shown)} more")
    return out


class StateDictMismatchError(RuntimeError):
    """A state_dict that does not fit a model; `report` holds the lists."""

    def __init__(self, model_name: str, report: StateDictReport, hint: str = ""):
        self.report = report
        lines = [f"the state_dict does not match {model_name}:"]
        lines += _listing("missing keys (in the model, not in the state_dict)", report.missing)
        lines += _listing("unexpected keys (in the state_dict, not in the model)", report.unexpected)
        lines += _listing(
            "shape mismatches",
            [f"{k}: state_dict {list(s)} vs model {list(m)}" for k, s, m in report.mismatched],
        )
        if hint:
            lines.append(f"  hint: {hint}")
        super().__init__("\n".join(lines))


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, object]) -> StateDictReport:
    """Missing keys, unexpected keys and shape mismatches of `state_dict` against `model`."""
    expected = model.state_dict()
    report = StateDictReport()
    for key, value in expected.items():
        if key not in state_dict:
            if not key.endswith(_TOLERATED_MISSING_SUFFIXES):
                report.missing.append(key)
            continue
        given = state_dict[key]
        if isinstance(given, torch.Tensor) and isinstance(value, torch.Tensor) and given.shape != value.shape:
            report.mismatched.append((key, tuple(given.shape), tuple(value.shape)))
    report.unexpected = [k for k in state_dict if k not in expected]
    return report


def _hint(model_keys: Iterable[str], report: StateDictReport) -> str:
    keys = set(model_keys)
    for prefix in WRAPPER_PREFIXES + ("encoder.", "decoder.", "model."):
        if report.unexpected and all(
            k.startswith(prefix) and k[len(prefix) :] in keys for k in report.unexpected
        ):
            return f"every unexpected key is a model key with the prefix {prefix!r}; strip it"
        if report.missing and all(k.startswith(prefix) for k in report.missing) and report.unexpected:
            if all(prefix + k in keys for k in report.unexpected):
                return f"the model's keys carry the prefix {prefix!r} that the state_dict lacks"
    return ""


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, object], strict: bool = True
) -> StateDictReport:
    """Raise `StateDictMismatchError` if `state_dict` does not fit `model` (shapes always, keys if strict)."""
    report = compare_state_dict(model, state_dict)
    if report.problems(strict):
        raise StateDictMismatchError(type(model).__name__, report, _hint(model.state_dict().keys(), report))
    return report


class ReadableLoadStateDict:
    """Mixin for nn.Module: `load_state_dict` checks first and lists every mismatch readably."""

    def load_state_dict(self, state_dict: Mapping[str, object], strict: bool = True, assign: bool = False):
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}"
            )
        check_state_dict(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def extract_state_dict(obj: object, model_keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint, unwrapped and with wrapper prefixes removed.

    Args:
        obj: a state_dict, or a dict holding one under one of `WRAPPER_KEYS` (possibly nested).
        model_keys: the target model's keys; a prefix is stripped only where the model lacks it.
    """
    seen = 0
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise TypeError(f"a checkpoint must be a dict of tensors or hold one; got {type(obj).__name__}")
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise ValueError(
                "no state_dict found in the checkpoint: it is not a dict of tensors and has none of the "
                f"entries {WRAPPER_KEYS}; its entries are {sorted(map(str, obj))[:_MAX_LISTED]}"
            )
        obj, seen = inner, seen + 1
        if seen > 8:
            raise ValueError("checkpoint wrappers nested more than 8 deep")
    state = dict(obj)
    keys = set(model_keys) if model_keys is not None else set()
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in keys):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that `torch.load` cannot read (empty, truncated, not written by torch.save)."""


def _source_name(source: str | os.PathLike | IO[bytes]) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", repr(source)))


def read_checkpoint(
    source: str | os.PathLike | IO[bytes], map_location: str | torch.device | None = "cpu"
) -> object:
    """`torch.load(source, weights_only=True)`, with an error naming the file when it is unreadable."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # these already name the file and say what is wrong
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():
            raise  # a pickle that wants to build objects other than tensors: torch's message says which
        raise _unreadable(source, err) from err
    except (EOFError, OSError, RuntimeError, KeyError, IndexError, ValueError, zipfile.BadZipFile) as err:
        # What torch.load raises for an empty file (EOFError()), a truncated one (OSError [Errno 22],
        # RuntimeError from the zip reader) or other bytes (KeyError, ...): none of them names the file.
        raise _unreadable(source, err) from err


def _unreadable(source: str | os.PathLike | IO[bytes], err: BaseException) -> UnreadableCheckpointError:
    size = ""
    if isinstance(source, (str, os.PathLike)):
        try:
            size = f" ({os.path.getsize(source)} bytes)"
        except OSError:
            pass
    first_line = str(err).strip().split("\n", 1)[0][:200]  # torch's own messages run to paragraphs
    detail = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return UnreadableCheckpointError(
        f"{_source_name(source)}{size} is not a readable checkpoint: it is empty, truncated or was not "
        f"written by torch.save ({detail})"
    )


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | IO[bytes] | Mapping[str, object],
    *,
    strict: bool = True,
    map_location: str | torch.device | None = "cpu",
) -> StateDictReport:
    """Load `source` into `model` in place; return what was missing/unexpected (non-strict only).

    Raises `StateDictMismatchError` (listing every difference) before changing any parameter, and
    `UnreadableCheckpointError` (a ValueError naming the file) for an empty, truncated or foreign file.
    """
    if isinstance(source, Mapping):
        obj = source
    else:
        obj = read_checkpoint(source, map_location)
    state = extract_state_dict(obj, model.state_dict().keys())
    report = check_state_dict(model, state, strict)
    model.load_state_dict(state, strict=strict)
    return report
