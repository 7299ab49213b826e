"""The drop-in classes on the meta device and with inference-tensor parameters (issue 13, items 5, 6)."""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.compat import BasicUNetPlusPlus, NestedUNet

FEATURES = (2, 2, 4, 4, 8, 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("training", [True, False])
def test_monai_and_nested_unet_on_meta(training):
    with torch.device("meta"):
        monai = BasicUNetPlusPlus(spatial_dims=2, features=FEATURES, norm="batch").train(training)
        nested = NestedUNet(2, 3).train(training)
        x1, x3 = torch.randn(2, 1, 16, 16), torch.randn(2, 3, 16, 16)
    assert [tuple(o.shape) for o in monai(x1)] == [(2, 2, 16, 16)]
    out = nested(x3)
    assert out.device.type == "meta" and out.shape == (2, 2, 16, 16)


def test_monai_built_under_inference_mode_runs_outside_it():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16)
    with torch.inference_mode():
        model = BasicUNetPlusPlus(spatial_dims=2, features=FEATURES, norm="batch").eval()
        inside = model(x)[0]
    fresh = BasicUNetPlusPlus(spatial_dims=2, features=FEATURES, norm="batch")
    fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert rel_err(model(x)[0], inside) <= 1e-6
        assert rel_err(fresh.eval()(x)[0], inside) <= 1e-5
