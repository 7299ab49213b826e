"""Inference through a CUDA graph: capture a warmed-up model once, replay it for every batch.

A UNet++ forward is ~34 short convolutions; at small images the GPU finishes each before Python
has launched the next. A CUDA graph launches the whole forward at once:

    fast = capture_inference(model.eval(), example)     # example: a CUDA tensor of the batch's shape
    y = fast(x)                                         # copies x into the graph's input, replays

The warm-up runs (default 3) happen before capture, so every Triton kernel is compiled and
tuned and every lazy initialisation is done; nothing in the fused operator's launch path syncs
the host, which capture requires. The graph reads the model's parameters where they are: updates
made in place (an optimizer step, `load_state_dict`) are seen by the next replay, BatchNorm is
folded inside the graph; moving the model (`.to()`, `.half()`) after capture is not, so capture
again. The returned output is the graph's own buffer, overwritten by the next call: clone it to
keep it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class _TorchCudaGraph:
    """The real CUDA graph calls, behind a seam so the helper's logic is testable on a CPU."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def warm_up(self, run: Callable[[], Any], times: int) -> None:
        # Warm-up on a side stream, as torch.cuda.graphs documents, so the capture stream is clean.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(times):
                run()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, run: Callable[[], Any]) -> Any:
        with torch.cuda.graph(self.graph):
            return run()

    def replay(self) -> None:
        self.graph.replay()


class CapturedInference:
    """A model's no-grad forward captured into a CUDA graph for one input shape, dtype and layout."""

    def __init__(self, model: nn.Module, example: torch.Tensor, warmup: int = 3, graph: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"example must be a tensor, got {type(example).__name__}")
        if model.training:
            raise ValueError(
                "model is in training mode: call model.eval() before capture_inference "
                "(a captured training forward would replay BatchNorm statistics updates)"
            )
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (kernels compile and tune there), got {warmup!r}")
        if graph is None:
            if example.device.type != "cuda":
                raise ValueError(
                    f"example must be a CUDA tensor (CUDA graphs need a GPU), got one on {example.device}"
                )
            graph = _TorchCudaGraph()
        self.model = model
        self._graph = graph
        self._input = example.detach().clone(memory_format=torch.preserve_format)

        def run() -> Any:
            with torch.no_grad():
                return model(self._input)

        graph.warm_up(run, warmup)
        self._output = graph.capture(run)

    def _check(self, x: torch.Tensor) -> None:
        expected = self._input
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.shape != expected.shape or x.dtype != expected.dtype or x.device != expected.device:
            raise ValueError(
                f"x must match the captured input: shape {tuple(expected.shape)}, {expected.dtype} on "
                f"{expected.device}; got shape {tuple(x.shape)}, {x.dtype} on {x.device} "
                "(capture again for another shape)"
            )

    def __call__(self, x: torch.Tensor) -> Any:
        """Run the captured forward on `x`; the result is overwritten by the next call."""
        self._check(x)
        self._input.copy_(x)
        self._graph.replay()
        return self._output


def capture_inference(model: nn.Module, example: torch.Tensor, warmup: int = 3) -> CapturedInference:
    """Capture `model`'s no-grad forward on inputs shaped like `example` into a CUDA graph."""
    return CapturedInference(model, example, warmup=warmup)
