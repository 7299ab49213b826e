"""A folded BatchNorm weight is never older than the module's parameters and buffers (issue 13, item 1),
and models built or converted under inference mode, or on the meta device, run (items 5 and 6).

Every check compares the model against a freshly built copy holding the same state (which cannot
have seen an earlier value), in relative norm.
"""

from __future__ import annotations

import pytest
import torch

import unetpp_fast
from unetpp_fast.nn.unetpp import UNetPlusPlus

FILTERS = (2, 4, 8, 16)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.5 * torch.randn(n, generator=gen))
                module.bias.copy_(0.5 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def fresh_copy(model: UNetPlusPlus) -> UNetPlusPlus:
    """A new instance with `model`'s state: whatever `model` cached, this one cannot have."""
    param = next(model.parameters())
    copy = UNetPlusPlus(3, 1, FILTERS).to(dtype=param.dtype)
    copy.load_state_dict(model.state_dict())
    for mine, theirs in zip(copy.modules(), model.modules()):
        if isinstance(mine, torch.nn.BatchNorm2d):
            mine.eps = theirs.eps
    return copy.train(model.training)


def small_model(dtype: torch.dtype = torch.float32) -> UNetPlusPlus:
    torch.manual_seed(0)
    model = UNetPlusPlus(3, 1, FILTERS)
    randomise_bn(model)
    return model.to(dtype).eval()


OPTIMIZERS = {
    "Adam": lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
    "SGD-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
    "Adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1, fused=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_optimizer_step_is_seen_by_the_next_eval_forward(name, dtype):
    # Fused optimizers update parameters without bumping their version counters.
    model = small_model(dtype)
    optimizer = OPTIMIZERS[name](model.parameters())
    x = torch.randn(1, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        before = model(x)
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = model(x)
        expected = fresh_copy(model)(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(before, expected) > 10 * tolerance  # the step did change the output
    assert rel_err(after, expected) <= tolerance


def test_bn_eps_change_is_seen():
    model = small_model()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        model(x)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = 0.3
        assert rel_err(model(x), fresh_copy(model)(x)) <= 1e-5


def test_data_edits_and_data_assignment_are_seen():
    model = small_model()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        model(x)
        for p in model.parameters():
            p.data.mul_(0.5)  # bypasses the version counter
        model.conv1_1.bn1.running_var.data = model.conv1_1.bn1.running_var * 4.0
        assert rel_err(model(x), fresh_copy(model)(x)) <= 1e-5


def test_functional_call_uses_the_given_parameters():
    model = small_model()
    x = torch.randn(1, 3, 16, 16)
    other = small_model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.7)
        model(x)
        got = torch.func.functional_call(model, dict(other.state_dict()), (x,))
        assert rel_err(got, other(x)) <= 1e-5
        assert rel_err(model(x), fresh_copy(model)(x)) <= 1e-5  # and the model itself is unchanged


def test_to_another_dtype_after_an_eval_forward():
    model = small_model()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        model(x)
        model.to(torch.float64)
        assert rel_err(model(x.double()), fresh_copy(model)(x.double())) <= 1e-12


def test_jit_trace_of_an_eval_model_passes_its_check():
    model = small_model()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_inputs=[(torch.randn(1, 3, 16, 16),)])
        y = torch.randn(1, 3, 16, 16)
        assert rel_err(traced(y), model(y)) <= 1e-6


def test_monai_adapter_eval_after_data_edit():
    from unetpp_fast.compat.monai_unetpp import BasicUNetPlusPlus

    torch.manual_seed(1)
    kwargs = dict(spatial_dims=2, in_channels=1, out_channels=2, features=(2, 2, 4, 4, 8, 2), norm="batch")
    model = BasicUNetPlusPlus(**kwargs)
    randomise_bn(model)
    model.eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        model(x)
        for p in model.parameters():
            p.data.mul_(0.5)
        model.eval()
        fresh = BasicUNetPlusPlus(**kwargs)
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        assert rel_err(model(x)[0], fresh(x)[0]) <= 1e-5


# --- item 5: inference tensors -------------------------------------------------------------------


def test_model_built_under_inference_mode_runs():
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        model = small_model()
        got = model(x)
    with torch.no_grad():
        expected = fresh_copy(model)(x)
    assert rel_err(got, expected) <= 1e-5
    with torch.no_grad():  # inference-tensor parameters, used outside inference mode
        assert rel_err(model(x), expected) <= 1e-5


def test_model_converted_under_inference_mode_runs():
    model = small_model()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.inference_mode():
        model.to(torch.float64)
        got = model(x)
    with torch.no_grad():
        assert rel_err(got, fresh_copy(model)(x)) <= 1e-12
        assert rel_err(model(x), got) <= 1e-12


# --- item 6: the meta device ----------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_model_on_meta_device_end_to_end(training):
    with torch.device("meta"):
        model = UNetPlusPlus(3, 2, FILTERS).train(training)
        x = torch.randn(2, 3, 16, 16, requires_grad=True)
    outputs = model(x)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    assert all(o.device.type == "meta" and o.shape == (2, 2, 16, 16) for o in outputs)
    sum(o.sum() for o in outputs).backward()
    assert x.grad is not None and x.grad.device.type == "meta" and x.grad.shape == x.shape
    assert model.conv0_0.conv1.weight.grad.shape == model.conv0_0.conv1.weight.shape


def test_meta_model_materialised_with_to_empty_matches_a_cpu_model():
    with torch.device("meta"):
        model = UNetPlusPlus(3, 1, FILTERS)
    model.to_empty(device="cpu")
    reference = small_model()
    model.load_state_dict(reference.state_dict())
    model.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) <= 1e-6


def test_meta_model_under_autocast():
    with torch.device("meta"):
        model = UNetPlusPlus(3, 1, FILTERS).eval()
        x = torch.randn(1, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).shape == (1, 1, 16, 16)
    assert unetpp_fast.fused_conv([x], torch.randn(2, 3, 3, 3, device="meta")).device.type == "meta"


# --- the explicit inference freeze: the one cache, and it refuses to train ------------------------


def test_freeze_reuses_one_fold_and_refuses_to_train():
    model = small_model()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        frozen = model.freeze()
        assert frozen is model and model.frozen and not model.training
        assert rel_err(model(x), expected) <= 1e-6
    with pytest.raises(RuntimeError, match=r"frozen for inference.*unfreeze\(\)"):
        model.train()
    with pytest.raises(RuntimeError, match="would not pass gradients"):
        model(x)  # grad mode with parameters requiring grad
    model.unfreeze()
    model.train()
    assert model.training and not model.frozen


def test_freeze_refolds_on_load_state_dict_and_dtype_change():
    model = small_model().freeze()
    other = small_model()
    randomise_bn(other, seed=5)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
        model.load_state_dict(other.state_dict())
        x = torch.randn(1, 3, 16, 16)
        assert rel_err(model(x), other.eval()(x)) <= 1e-5
        model.double()
        assert rel_err(model(x.double()), other.double()(x.double())) <= 1e-12
