"""torch.func on whole networks (issue 13, item 2): grad equals backward, jvp equals finite differences."""

from __future__ import annotations

import torch

import unetpp_fast


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_func_grad_of_a_model_equals_backward():
    torch.manual_seed(0)
    model = unetpp_fast.UNetPlusPlus(3, 1, (2, 4, 8), block="conv_relu").double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)

    def loss(outputs):
        return sum(o.square().sum() for o in outputs)

    grads = torch.func.grad(lambda p: loss(torch.func.functional_call(model, p, (x,))))(
        dict(model.named_parameters())
    )
    loss(model(x)).backward()
    assert max(rel_err(grads[k], p.grad) for k, p in model.named_parameters()) < 1e-12


def test_func_jvp_of_an_eval_model_with_folded_batchnorm():
    torch.manual_seed(1)
    model = unetpp_fast.UNetPlusPlus(3, 1, (2, 4, 8)).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    primals = {k: v.detach() for k, v in model.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in primals.items()}
    _, tangent = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)), (primals,), (tangents,))
    eps = 1e-6
    with torch.no_grad():
        plus = torch.func.functional_call(model, {k: v + eps * tangents[k] for k, v in primals.items()}, (x,))
        minus = torch.func.functional_call(
            model, {k: v - eps * tangents[k] for k, v in primals.items()}, (x,)
        )
    assert tangent.abs().max() > 1e-3
    assert rel_err(tangent, (plus - minus) / (2 * eps)) < 1e-7
