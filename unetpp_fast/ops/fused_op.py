"""The `unetpp_fast::fused_conv` operator: schema, fake implementation, autograd, Python wrapper.

    virtual = cat([R_p(pieces[p]) for p], dim=1)       # never materialised by the fused backends
    out     = act(conv2d(virtual, weight, bias, padding=k // 2))

3D is the same operator on 5-D pieces [N, C, D, H, W] with a 5-D weight (conv3d; the interpolating
resample codes mean trilinear, maxpool2 a 2x2x2 window). Backends declare which spatial dimensions
they take; `auto` skips one that cannot take a 3D call (the reference backend takes both).

The operator routes each call to the backend chosen by `unetpp_fast.ops.backends` at run time
(skipping, under `auto`, a backend that cannot take the dtype or piece count).

Host path: in eager mode the wrapper `fused_conv` validates once per kind of call (`call_facts`),
resolves the backend (`auto`: measured once per kind, `backend_choice`) and, when no gradient is
needed, calls that backend directly — the dispatcher costs more than a small GPU kernel. With a
gradient, or under the profiler, it calls the operator with that backend forced, so autograd and
the recorded events are the operator's own. torch.compile, torch.export, fake/meta tensors, tensor
subclasses, dispatch or function modes, functorch transforms, forward-mode AD and the JIT tracer
always take the operator (where `auto` is the fixed order). Its backward is an
operator of its own (`unetpp_fast::fused_conv_backward`) that is told which backend ran the forward,
so a forward forced onto one backend is differentiated by the same backend. It saves the pieces by
reference (they are other nodes' outputs, alive anyway) and, for a non-linear activation, the output
for the activation mask — never the concatenated input.

Degenerate shapes follow one rule on every backend, decided here before any backend runs:
C_out = 0 gives an empty [N, 0, H, W] output; C_in = 0 (every piece has zero channels) gives
act(bias) (act(0) without bias) broadcast to [N, C_out, H, W] — a sum over no channels is zero.

Transforms: reverse-mode autograd runs through the operator's registered autograd. Forward-mode AD
(`torch.autograd.forward_ad`, `torch.func.jvp`) and the functorch transforms (`torch.func.grad`,
`vjp`, `jacrev`, `jacfwd`, `vmap`) go through `_FusedConvFunction`, which has a jvp: the op is
bilinear in (pieces, weight), so the tangent is one fused conv per tangent argument, plus the bias
tangent, times the activation's derivative (read from the output). Under the torch.func transforms
the backward is the reference adjoint (plain PyTorch, which every transform can trace); the forward
still runs on the chosen backend. Forward-mode AD needs this wrapper: the raw operator
`torch.ops.unetpp_fast.fused_conv` drops tangents, as every `torch.library.custom_op` does (its
generated autograd has no jvp), so call `unetpp_fast.fused_conv` for forward-mode AD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from unetpp_fast.ops import backend_choice, backends, call_facts, conv_spec

# Importing the backend modules registers them; none of them imports Triton or touches CUDA here.
from unetpp_fast.ops import native as _backend_native  # noqa: F401  (registers 'cpu' and 'cuda')
from unetpp_fast.ops import reference as _reference
from unetpp_fast.ops.triton import backend as _backend_triton  # noqa: F401  (registers 'triton')

Tensor = torch.Tensor


def _backend_for(pieces: Sequence[Tensor], weight: Tensor, name: str = "auto") -> str:
    """The backend that runs this call: `name`, or the requested one when `name` is 'auto'."""
    requested = backends.requested_backend() if name == "auto" else name
    if weight.device.type == "meta":  # only the fake implementation runs on meta: nothing to pick
        return requested
    return backends.resolve_name(
        weight.device, requested, dtype=weight.dtype, num_pieces=len(pieces), spatial_dims=weight.dim() - 2
    )


def _is_degenerate(weight: Tensor) -> bool:
    return weight.shape[0] == 0 or weight.shape[1] == 0


def _degenerate_forward(
    pieces: Sequence[Tensor], weight: Tensor, bias: Tensor | None, activation: str, out_hw: tuple[int, ...]
) -> Tensor:
    c_out = weight.shape[0]
    pre = bias if bias is not None else weight.new_zeros(c_out)
    value = _reference.apply_activation(pre.reshape(1, c_out, *[1] * len(out_hw)), activation)
    out = weight.new_empty((pieces[0].shape[0], c_out, *out_hw))
    out = out.contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))
    return out.copy_(value.expand_as(out))  # a fresh tensor: op outputs may not alias inputs


def _degenerate_backward(
    grad_out: Tensor,
    pieces: Sequence[Tensor],
    weight: Tensor,
    out: Tensor | None,
    has_bias: bool,
    activation: str,
) -> list[Tensor]:
    grads = [torch.zeros_like(p, memory_format=conv_spec.output_memory_format(p)) for p in pieces]
    grads.append(torch.zeros_like(weight, memory_format=torch.contiguous_format))
    if has_bias:
        spatial = tuple(range(2, grad_out.dim()))
        grads.append(_reference.activation_grad(grad_out, out, activation).sum(dim=(0, *spatial)))
    else:
        grads.append(weight.new_empty(0))
    return grads


@torch.library.custom_op("unetpp_fast::fused_conv", mutates_args=())
def fused_conv_op(
    pieces: list[Tensor], resample: list[int], weight: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    out_hw = _validated_out_size(pieces, resample, weight, bias, activation)
    name = _backend_for(pieces, weight)
    backends.record_call(name)
    if _is_degenerate(weight):
        return _degenerate_forward(pieces, weight, bias, activation, out_hw)
    return backends.get_impl(name).forward(pieces, resample, weight, bias, activation)


def _validated_out_size(
    pieces: list[Tensor], resample: list[int], weight: Tensor, bias: Tensor | None, activation: str
) -> tuple[int, ...]:
    # The wrapper has validated this kind of call already: the operator re-validates from the cache.
    # Only exact ints are keyed (True == 1 in a dict, but True is not a resample code).
    if all(type(c) is int for c in resample):
        key = call_facts.metadata_key(pieces, tuple(resample), weight, bias, activation)
        if key is not None:
            return call_facts.facts(pieces, tuple(resample), weight, bias, activation, key).out_spatial
    return conv_spec.check_inputs(pieces, resample, weight, bias, activation)


@fused_conv_op.register_fake
def _fused_conv_fake(pieces, resample, weight, bias, activation):
    spatial = conv_spec.check_inputs(pieces, resample, weight, bias, activation)
    shape = (pieces[0].shape[0], weight.shape[0], *spatial)
    return weight.new_empty(shape).contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))


@torch.library.custom_op("unetpp_fast::fused_conv_backward", mutates_args=())
def fused_conv_backward_op(
    grad_out: Tensor,
    pieces: list[Tensor],
    resample: list[int],
    weight: Tensor,
    out: Tensor | None,
    has_bias: bool,
    activation: str,
    backend: str = "auto",
) -> list[Tensor]:
    """[grad_piece_0, ..., grad_piece_{n-1}, grad_weight, grad_bias (empty when has_bias is False)].

    `backend` names the backend that ran the forward ('auto': resolve now, as a forward would).
    """
    grad_out = grad_out.contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))
    if _is_degenerate(weight):
        return _degenerate_backward(grad_out, pieces, weight, out, has_bias, activation)
    name = _backend_for(pieces, weight, backend)
    return backends.get_impl(name).backward(grad_out, pieces, resample, weight, out, has_bias, activation)


@fused_conv_backward_op.register_fake
def _fused_conv_backward_fake(grad_out, pieces, resample, weight, out, has_bias, activation, backend="auto"):
    grads = [torch.empty_like(p) for p in pieces]
    grads.append(torch.empty_like(weight, memory_format=torch.contiguous_format))
    grads.append(weight.new_empty(weight.shape[0] if has_bias else 0))
    return grads


def _setup_context(ctx, inputs, output):
    pieces, resample, weight, bias, activation = inputs
    ctx.resample = list(resample)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.num_pieces = len(pieces)
    # Resolved now, in the forward's own context (use_backend, backend=...): the backward may run
    # outside it, and must still run on the backend that computed this output.
    ctx.backend = _backend_for(pieces, weight)
    needs_out = conv_spec.parse_activation(activation)[0] != "none"
    ctx.save_for_backward(*pieces, weight, output if needs_out else None)


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    pieces, weight, out = list(saved[: ctx.num_pieces]), saved[ctx.num_pieces], saved[ctx.num_pieces + 1]
    grads = fused_conv_backward_op(
        grad_out, pieces, ctx.resample, weight, out, ctx.has_bias, ctx.activation, ctx.backend
    )
    grad_pieces = list(grads[: ctx.num_pieces])
    grad_bias = grads[-1] if ctx.has_bias else None
    return grad_pieces, None, grads[ctx.num_pieces], grad_bias, None


fused_conv_op.register_autograd(_backward, setup_context=_setup_context)


# --- vmap: a loop over the mapped dimension (what jacrev / jacfwd / vmap need) ------------------


def _select(t: Tensor | None, dim: int | None, index: int) -> Tensor | None:
    return t if t is None or dim is None else t.select(dim, index)


@fused_conv_op.register_vmap
def _fused_conv_vmap(info, in_dims, pieces, resample, weight, bias, activation):
    piece_dims, _, weight_dim, bias_dim, _ = in_dims
    piece_dims = piece_dims if piece_dims is not None else [None] * len(pieces)
    outs = [
        fused_conv_op(
            [_select(p, d, b) for p, d in zip(pieces, piece_dims)],
            resample,
            _select(weight, weight_dim, b),
            _select(bias, bias_dim, b),
            activation,
        )
        for b in range(info.batch_size)
    ]
    return torch.stack(outs), 0


@fused_conv_backward_op.register_vmap
def _fused_conv_backward_vmap(
    info, in_dims, grad_out, pieces, resample, weight, out, has_bias, activation, backend="auto"
):
    grad_dim, piece_dims, _, weight_dim, out_dim = in_dims[:5]
    piece_dims = piece_dims if piece_dims is not None else [None] * len(pieces)
    per_item = [
        fused_conv_backward_op(
            _select(grad_out, grad_dim, b),
            [_select(p, d, b) for p, d in zip(pieces, piece_dims)],
            resample,
            _select(weight, weight_dim, b),
            _select(out, out_dim, b),
            has_bias,
            activation,
            backend,
        )
        for b in range(info.batch_size)
    ]
    return [torch.stack(column) for column in zip(*per_item)], [0] * len(per_item[0])


# --- forward-mode AD and functorch transforms ---------------------------------------------------


def _maxpool_tangent(piece: Tensor, tangent: Tensor) -> Tensor:
    """The tangent of max_pool2d(piece, 2) (max_pool3d for 5-D): the tangent at each window's arg-max."""
    pool = F.max_pool3d if piece.dim() == 5 else F.max_pool2d
    _, indices = pool(piece, 2, return_indices=True)
    flat = tangent.flatten(2).gather(2, indices.flatten(2))
    return flat.view_as(indices)


class _FusedConvFunction(torch.autograd.Function):
    """fused_conv with a jvp, for forward-mode AD and the torch.func transforms.

    Inputs: (num_pieces, resample, activation, backend, has_bias, *pieces, weight[, bias]); the
    tensors are top-level arguments so that autograd sees each of them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(num_pieces, resample, activation, backend, has_bias, *tensors):
        pieces, weight = list(tensors[:num_pieces]), tensors[num_pieces]
        bias = tensors[num_pieces + 1] if has_bias else None
        with backends.use_backend(backend):
            return fused_conv_op(pieces, resample, weight, bias, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        num_pieces, resample, activation, backend, has_bias, *tensors = inputs
        ctx.num_pieces, ctx.resample, ctx.activation = num_pieces, list(resample), activation
        ctx.backend, ctx.has_bias = backend, has_bias
        needs_out = conv_spec.parse_activation(activation)[0] != "none"
        saved = (*tensors[: num_pieces + 1], output if needs_out else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        n = ctx.num_pieces
        # Under torch.func transforms the custom op cannot be called here (its generated autograd
        # wrapper refuses them); the reference adjoint is plain PyTorch, which every transform handles.
        run = _reference.backward if torch._C._are_functorch_transforms_active() else fused_conv_backward_op
        grads = run(
            grad_out,
            list(saved[:n]),
            ctx.resample,
            saved[n],
            saved[n + 1],
            ctx.has_bias,
            ctx.activation,
            *([] if run is _reference.backward else [ctx.backend]),
        )
        result = [None] * 5 + list(grads[: n + 1])
        if ctx.has_bias:
            result.append(grads[-1])
        return tuple(result)

    @staticmethod
    def jvp(ctx, *tangents):
        saved = ctx.saved_tensors
        n = ctx.num_pieces
        pieces, weight, out = list(saved[:n]), saved[n], saved[n + 1]
        t_pieces, t_weight = tangents[5 : 5 + n], tangents[5 + n]
        t_bias = tangents[6 + n] if ctx.has_bias else None
        terms = []
        with backends.use_backend(ctx.backend):
            if any(t is not None for t in t_pieces):
                # Linear in the pieces, except max-pooling: its tangent is taken at the arg-max.
                lifted, codes = [], []
                for piece, tangent, code in zip(pieces, t_pieces, ctx.resample):
                    tangent = torch.zeros_like(piece) if tangent is None else tangent
                    if code == conv_spec.MAXPOOL2:
                        lifted.append(_maxpool_tangent(piece, tangent))
                        codes.append(conv_spec.NONE)
                    else:
                        lifted.append(tangent)
                        codes.append(code)
                terms.append(fused_conv_op(lifted, codes, weight, None, "none"))
            if t_weight is not None:
                terms.append(fused_conv_op(pieces, ctx.resample, t_weight, None, "none"))
        if t_bias is not None:
            terms.append(t_bias.reshape(1, -1, *[1] * (weight.dim() - 2)))
        if out is None:  # activation 'none': out is not saved; the shape comes from a term
            shape_like = terms[0] if terms else None
        else:
            shape_like = out
        if not terms:
            return torch.zeros_like(shape_like)
        pre = terms[0]
        for term in terms[1:]:
            pre = pre + term
        pre = pre.expand_as(shape_like) if pre.shape != shape_like.shape else pre
        return _reference.activation_grad(pre, out, ctx.activation).contiguous(
            memory_format=conv_spec.output_memory_format(pieces[0])
        )


def _has_forward_tangent(tensors: Sequence[Tensor | None]) -> bool:
    if fwAD._current_level < 0:  # no dual level open: no tangent can exist
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _needs_function_path(tensors: Sequence[Tensor | None]) -> bool:
    # The compiler traces the custom op itself (a custom jvp would break the graph).
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or _has_forward_tangent(tensors)


# --- autocast ------------------------------------------------------------------------------------


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    # Devices without autocast (meta among them) have nothing to query.
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(t: object, dtype: torch.dtype) -> object:
    # Autocast's rule (as for F.conv2d): floating tensors other than float64 take the autocast dtype.
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def fused_conv(
    pieces: Sequence[Tensor] | Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    resample: Sequence[int | str] | None = None,
    activation: str = "relu",
    backend: str = "auto",
) -> Tensor:
    """Convolve the virtual concatenation of `pieces` (each resampled first) with `weight`.

    Args:
        pieces: tensors [N, C_p, H_p, W_p] (or one tensor); concatenated along channels, virtually.
            3D: 5-D tensors [N, C_p, D_p, H_p, W_p], every piece the same rank.
        weight: [C_out, sum(C_p), k, k] (3D: [C_out, sum(C_p), k, k, k]), k in {1, 3}; stride 1,
            padding k // 2.
        bias: [C_out] or None.
        resample: per piece 'none', 'up_nearest', 'up_bilinear', 'up_bilinear_ac' (align_corners
            True) or 'maxpool2' (or their codes 0..4); default all 'none'. For 5-D pieces the
            names are 'none', 'up_nearest', 'up_trilinear', 'up_trilinear_ac', 'maxpool2' (2x2x2),
            with the same codes 0..4.
        activation: 'none', 'relu', 'leaky_relu' or 'leaky_relu:<slope>', applied in the epilogue.
        backend: 'auto', 'reference', 'triton', 'cuda' or 'cpu'; a named backend that cannot run
            these tensors raises instead of falling back. The same backend runs the backward.

    Returns:
        [N, C_out, H, W] ([N, C_out, D, H, W]) in the first piece's memory format (channels_last /
        channels_last_3d or contiguous). Under `torch.autocast` floating inputs
        other than float64 are cast to the autocast dtype first (autocast's rule for conv2d).
    """
    if not torch.compiler.is_compiling():  # the compiler traces the general path below
        out = _eager_call(pieces, weight, bias, resample, activation, backend)
        if out is not None:
            return out
    if isinstance(pieces, Tensor):
        pieces = [pieces]
    if not isinstance(pieces, (list, tuple)):
        raise ValueError(f"pieces must be a non-empty list of 4-D tensors, got {type(pieces).__name__}")
    pieces = list(pieces)
    if resample is None:
        codes = [conv_spec.NONE] * len(pieces)
    else:
        if isinstance(resample, (str, int)):
            raise ValueError("resample must be a list with one mode per piece, e.g. ['none', 'up_bilinear']")
        first = pieces[0] if pieces and isinstance(pieces[0], Tensor) else None
        dims = first.dim() - 2 if first is not None and first.dim() in (4, 5) else None
        codes = [conv_spec.resample_code(m, f"resample[{i}]", dims) for i, m in enumerate(resample)]
    if isinstance(weight, Tensor):
        cast = _autocast_dtype(weight.device.type)
        if cast is not None:
            pieces = [_autocast(p, cast) for p in pieces]
            weight = _autocast(weight, cast)
            bias = _autocast(bias, cast)
    conv_spec.check_inputs(pieces, codes, weight, bias, activation)
    if backend != "auto":
        with backends.use_backend(backend):
            return _call(pieces, codes, weight, bias, activation)
    return _call(pieces, codes, weight, bias, activation)


def _call(
    pieces: list[Tensor], codes: list[int], weight: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    if _needs_function_path([*pieces, weight, bias]):
        name = _backend_for(pieces, weight)
        tensors = [*pieces, weight] + ([bias] if bias is not None else [])
        return _FusedConvFunction.apply(len(pieces), codes, activation, name, bias is not None, *tensors)
    return fused_conv_op(pieces, codes, weight, bias, activation)


# --- the eager path: one validation, the backend chosen by measurement, no dispatcher when it can --


_NO_RESAMPLE: dict[int, tuple[int, ...]] = {}
_CODES: dict[tuple, tuple[int, ...]] = {}  # (spatial dims, *mode names) -> codes; names only


def _codes_of(resample: object, pieces: list, dims: int | None) -> tuple[int, ...] | None:
    """The resample codes (raising the wrapper's errors for bad modes); None: the general path."""
    if resample is None:
        codes = _NO_RESAMPLE.get(len(pieces))
        if codes is None:
            codes = _NO_RESAMPLE[len(pieces)] = (conv_spec.NONE,) * len(pieces)
        return codes
    if type(resample) not in (list, tuple):
        return None
    key = (dims, *resample)
    try:
        codes = _CODES.get(key)
    except TypeError:  # an unhashable mode: the general path says what is wrong
        return None
    if codes is None:
        codes = tuple(conv_spec.resample_code(m, f"resample[{i}]", dims) for i, m in enumerate(resample))
        # Only names are kept: a str never equals an int, so True (== 1) can never hit a code.
        if all(type(m) is str for m in resample):
            _CODES[key] = codes
    return codes


def _interposed() -> bool:
    """Something that must see the operator itself: a functorch transform, a forward-AD level,
    a dispatch or function mode (FakeTensorMode, export, ...), the JIT tracer."""
    return (
        torch._C._are_functorch_transforms_active()
        or fwAD._current_level >= 0
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._get_tracing_state() is not None
    )


def _eager_call(
    pieces: object, weight: Tensor, bias: Tensor | None, resample: object, activation: str, backend: str
) -> Tensor | None:
    """fused_conv for plain tensors in eager mode; None when the general path must run instead.

    Validates once per kind of call (call_facts), resolves the backend (auto: measured, once per
    kind), and calls the backend directly when no gradient is needed (no dispatcher: it costs more
    than a small GPU kernel); with a gradient, or under the profiler, it goes through the operator
    with the chosen backend forced, so autograd and the recorded events are the operator's own.
    """
    if type(pieces) is list:
        pass
    elif type(pieces) is tuple:
        pieces = list(pieces)
    elif type(pieces) in call_facts.PLAIN_TENSOR_TYPES:
        pieces = [pieces]
    else:
        return None
    if not pieces or type(pieces[0]) not in call_facts.PLAIN_TENSOR_TYPES or _interposed():
        return None
    dims = pieces[0].dim() - 2
    codes = _codes_of(resample, pieces, dims if dims in conv_spec.SPATIAL_DIMS else None)
    if codes is None:
        return None
    if torch._C._is_any_autocast_enabled():
        cast = _autocast_dtype(weight.device.type) if isinstance(weight, Tensor) else None
        if cast is not None:
            pieces = [_autocast(p, cast) for p in pieces]
            weight, bias = _autocast(weight, cast), _autocast(bias, cast)
    try:
        key = call_facts.metadata_key(pieces, codes, weight, bias, activation)
        if key is None:
            return None
        found = call_facts.facts(pieces, codes, weight, bias, activation, key)
    except TypeError as exc:
        if "unhashable" in str(exc):  # e.g. an activation that is a list: the general path says so
            return None
        raise
    device = weight.device
    if device.type not in ("cpu", "cuda"):  # meta: the fake implementation; others: the general path
        return None
    training = torch.is_grad_enabled() and (
        weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or any(p.requires_grad for p in pieces)
    )
    name = _eager_backend(found, pieces, codes, weight, bias, activation, backend, training)
    if training or torch._C._autograd._profiler_enabled():
        with backends.use_backend(name):
            return fused_conv_op(pieces, list(codes), weight, bias, activation)
    backends.record_call(name)
    if found.degenerate:
        return _degenerate_forward(pieces, weight, bias, activation, found.out_spatial)
    return backends.get_impl(name).forward(pieces, list(codes), weight, bias, activation)


def _eager_backend(
    found: call_facts.CallFacts,
    pieces: list[Tensor],
    codes: tuple[int, ...],
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    backend: str,
    training: bool,
) -> str:
    requested = backends.requested_backend() if backend == "auto" else backends.check_name(backend, "backend")
    dims = weight.dim() - 2
    if requested != "auto":  # forced: used or a clear error, never a fallback
        return backends.check_forced(requested, weight.device, weight.dtype, len(pieces), dims)
    if found.degenerate:  # nothing runs: no measuring
        return backends.resolve_name(
            weight.device, "auto", dtype=weight.dtype, num_pieces=len(pieces), spatial_dims=dims
        )
    key = backend_choice.choice_key(found.kind, training, weight.device)
    return backend_choice.choose(key, pieces, codes, weight, bias, activation, training)
