"""zoo.models.dense: fp32 products through oneDNN equal F.linear's to fp32 round-off.

Values, first and second derivatives (conservative forces train through a double backward), on the
operand layouts eSEN hands it (blocks of larger tensors, transposes in the backward), empty edge
sets, and the fall-backs (other dtypes, the switch, dispatch modes). Speed: benchmarks/.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from zoo.models import dense
from zoo.models.dense import Linear, linear, takes_onednn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

#: fp32 round-off of sums of ≤ 64 products of O(1) terms, relative to the largest |value|
RTOL = 2e-6


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    scale = float(b.detach().abs().max()) or 1.0
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=rtol * scale)


def operands(layout: str, bias: bool, out: int = 8, inp: int = 16):
    """``x`` ``[5, 3, inp]`` (as a block of a larger tensor, or contiguous), ``weight`` ``[out, inp]``, ``bias``."""
    gen = torch.Generator().manual_seed(1)
    if layout == "block":  # the l = 1 block of [N, 9, C] features, as SO3Linear takes it
        x = torch.randn(5, 9, inp, generator=gen)[:, 1:4].requires_grad_()
    else:
        x = torch.randn(5, 3, inp, generator=gen, requires_grad=True)
    weight = torch.randn(out, inp, generator=gen, requires_grad=True)
    b = torch.randn(out, generator=gen, requires_grad=True) if bias else None
    return x, weight, b


@pytest.mark.parametrize("shape", [(8, 16), (24, 16), (24, 4)], ids=["narrow", "wide", "few-inputs"])  # (out, in): every orientation of the weight gradient
@pytest.mark.parametrize("kernel", ["mm", "onednn"])  # the weight gradient's product: small weights torch.mm, large ones oneDNN
@pytest.mark.parametrize("layout", ["contiguous", "block"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_value_gradient_and_second_derivative_equal_f_linear(layout, bias, shape, kernel, monkeypatch):
    if kernel == "onednn":
        monkeypatch.setattr(dense, "MM_WEIGHT_GRAD_ELEMENTS", 0)
    out, inp = shape
    x, weight, b = operands(layout, bias, out, inp)
    assert takes_onednn(x, weight)
    inputs = [t for t in (x, weight, b) if t is not None]
    probe = torch.randn(5, 3, out, generator=torch.Generator().manual_seed(2))
    results = []
    for f in (linear, F.linear):
        y = f(x, weight, b)  # [5, 3, 8]
        grads = torch.autograd.grad((torch.tanh(y) * probe).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), inputs)  # through the backward
        results.append((y, *grads, *second))
    assert type(results[0][0].grad_fn.next_functions[0][0]).__name__ == "_LinearBackward"  # (under the reshape)
    for new, old in zip(*results):
        close(new, old)


def test_the_onednn_function_is_the_one_recorded():
    x, weight, b = operands("contiguous", True)
    y = linear(x.reshape(15, 16), weight, b)
    assert type(y.grad_fn).__name__ == "_LinearBackward"


@pytest.mark.parametrize("mm_limit", [dense.MM_WEIGHT_GRAD_ELEMENTS, 0], ids=["weight-grad-mm", "weight-grad-onednn"])
def test_gradients_not_asked_for_are_not_computed(monkeypatch, mm_limit):
    """``autograd.grad(energy, positions)`` (conservative forces) needs no weight gradient: like
    ATen's formulas, the backward computes only what the running call asks for. (A weight as small
    as this one takes its gradient from ``torch.mm``, not oneDNN, unless the limit is set to 0.)"""
    monkeypatch.setattr(dense, "MM_WEIGHT_GRAD_ELEMENTS", mm_limit)
    products = []
    onednn = dense._onednn
    monkeypatch.setattr(dense, "_onednn", lambda *args: products.append(args[1].shape) or onednn(*args))
    x, weight, b = operands("contiguous", True)
    y = linear(x, weight, b)
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    assert len(products) == 2  # the forward and grad_x only
    close(grad_x, torch.autograd.grad(F.linear(x, weight, b).sum(), x)[0])
    linear(x, weight, b).sum().backward()
    assert len(products) == (4 if mm_limit else 5) and weight.grad is not None and x.grad is not None
    close(weight.grad, torch.autograd.grad(F.linear(x, weight, b).sum(), weight)[0])


def test_no_rows_and_empty_contraction():
    """A batch without edges: zero rows forward, an empty contraction in the weight gradient."""
    weight = torch.randn(4, 6, requires_grad=True)
    x = torch.zeros(0, 6, requires_grad=True)
    y = linear(x, weight, torch.zeros(4))
    assert y.shape == (0, 4)
    (grad_w,) = torch.autograd.grad(y.sum(), weight)
    assert torch.equal(grad_w, torch.zeros(4, 6))
    assert linear(torch.zeros(3, 0), torch.zeros(2, 0)).shape == (3, 2)


def test_fall_backs_give_f_linear_exactly():
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(7, 5, generator=gen), torch.randn(4, 5, generator=gen)
    assert not takes_onednn(x.double(), weight.double())  # float64: F.linear (oneDNN has no f64 product)
    assert torch.equal(linear(x.double(), weight.double()), F.linear(x.double(), weight.double()))
    with torch.backends.mkldnn.flags(enabled=False):  # the documented switch
        assert not takes_onednn(x, weight)
        assert torch.equal(linear(x, weight), F.linear(x, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 policy applies
        assert not takes_onednn(x, weight) and linear(x, weight).dtype == torch.bfloat16
    with FlopCounterMode(display=False) as mode:  # dispatch modes (the FLOP counters) see aten ops
        linear(x, weight)
    assert mode.get_total_flops() == 2 * 7 * 5 * 4


def test_meta_tensors_take_the_same_path():
    """The memory planner builds on meta: the same Function (and saved tensors) as on the CPU."""
    x = torch.empty(6, 5, device="meta", requires_grad=True)
    weight = torch.empty(4, 5, device="meta", requires_grad=True)
    assert takes_onednn(x, weight)
    y = linear(x, weight)
    assert y.shape == (6, 4) and type(y.grad_fn).__name__ == "_LinearBackward"


def test_padded_transposed_weight_is_made_contiguous():
    """The transpose of a block (leading dimension wider than the rows) sends oneDNN to its
    reference kernel (1000x slower); _onednn hands it a contiguous copy — same values."""
    base = torch.randn(10, 9, 12)
    x, w = torch.randn(12, 10), base[:, 0].t()  # w [12, 10], strides (1, 108)
    assert not (w.is_contiguous() or w.t().is_contiguous())
    close(dense._onednn(x, w, None), x @ w.T)


def test_linear_module_keeps_nn_linear_parameters():
    torch.manual_seed(0)
    plain = torch.nn.Linear(5, 3)
    torch.manual_seed(0)
    fast = Linear(5, 3)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), plain.parameters()))
    close(fast(torch.ones(2, 5)), plain(torch.ones(2, 5)))


def test_mismatched_input_is_refused():
    with pytest.raises(ValueError, match="does not match weight"):
        linear(torch.zeros(2, 3), torch.zeros(4, 5))
