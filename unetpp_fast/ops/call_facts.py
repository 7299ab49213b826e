"""One validation per kind of call: `check_inputs` run once per call metadata, its result kept.

Validating a call (`conv_spec.check_inputs`) and the facts derived from it (output size, memory
format, what `auto` keys its choice on) depend only on metadata: each tensor's shape, dtype and
device, the first piece's strides (its layout), the resample codes and the activation string. The
result is a pure function of that key, so keeping it can never serve a stale answer; the values of
the tensors are never read. Only plain tensors (torch.Tensor, nn.Parameter) are keyed: a subclass
may answer metadata differently and is always validated afresh. Failing calls are not kept (they
raise each time, with the same message).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unetpp_fast.ops import backend_choice, conv_spec

PLAIN_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_MAX_ENTRIES = 4096  # a bound, not a working-set guess: a model has a few dozen kinds of call


@dataclass(frozen=True)
class CallFacts:
    """What one validated kind of call is."""

    out_spatial: tuple[int, ...]  # (H, W) or (D, H, W)
    degenerate: bool  # C_out == 0 or C_in == 0: decided before any backend runs
    kind: tuple  # backend_choice.call_kind: what `auto` keys its measured choice on


_FACTS: dict[tuple, CallFacts] = {}


def metadata_key(
    pieces: Sequence[torch.Tensor],
    codes: tuple[int, ...],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> tuple | None:
    """The key of a call of plain tensors (None when some argument is not a plain tensor)."""
    types = PLAIN_TENSOR_TYPES
    if type(weight) not in types or (bias is not None and type(bias) not in types):
        return None
    key = [
        activation,
        codes,
        weight.shape,
        weight.dtype,
        weight.device,
        None if bias is None else (bias.shape, bias.dtype, bias.device),
    ]
    for piece in pieces:
        if type(piece) not in types:
            return None
        key += (piece.shape, piece.dtype, piece.device)
    key.append(pieces[0].stride())
    return tuple(key)


def facts(
    pieces: Sequence[torch.Tensor],
    codes: tuple[int, ...],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    key: tuple | None,
) -> CallFacts:
    """Validate the call (once per `key`; every time when `key` is None) and say what it is.
    Raises the ValueError/TypeError of `conv_spec.check_inputs` for bad input."""
    found = _FACTS.get(key) if key is not None else None
    if found is not None:
        return found
    out_spatial = conv_spec.check_inputs(pieces, codes, weight, bias, activation)
    found = CallFacts(
        out_spatial=tuple(int(s) for s in out_spatial),
        degenerate=weight.shape[0] == 0 or weight.shape[1] == 0,
        kind=backend_choice.call_kind(
            weight.device,
            weight.dtype,
            conv_spec.output_memory_format(pieces[0]) != torch.contiguous_format,
            codes,
            [p.shape[1] for p in pieces],
            weight.shape,
            bias is not None,
            conv_spec.parse_activation(activation)[0],
            int(pieces[0].shape[0]) * math.prod(out_spatial),
        ),
    )
    if key is not None:
        if len(_FACTS) >= _MAX_ENTRIES:
            _FACTS.clear()
        _FACTS[key] = found
    return found
