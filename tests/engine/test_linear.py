"""The linear layer's forms agree, whichever one a machine's timing picks for single rows; the
single-row kernel computes each row the same way however many rows it is given."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from engine.model.linear import Linear, RowProduct, fastest_single_row_form, prepack_works, row_linear, single_row_forms

needs_prepack = pytest.mark.skipif(
    not prepack_works(torch.float32, torch.device("cpu")), reason="this torch build has no oneDNN packed linear"
)


@pytest.fixture(scope="module")
def kernel() -> RowProduct:
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here: single rows run through torch's products")
    built = row_linear()
    assert built is not None, "a C++ compiler is here but the kernels did not build (see the warning logged)"
    return built


def weight_bias_x(num_rows: int, num_out: int = 96, num_in: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_out, num_in, generator=generator)
    bias = torch.randn(num_out, generator=generator)
    return weight, bias, torch.randn(num_rows, num_in, generator=generator)


@needs_prepack
@pytest.mark.parametrize("single_row", ["dense", "packed", "kernel"])
@pytest.mark.parametrize("num_rows", [1, 3, 17])
def test_every_form_gives_the_same_product(single_row: str, num_rows: int) -> None:
    if single_row == "kernel" and row_linear() is None:
        pytest.skip("no CPU kernels here")
    weight, bias, x = weight_bias_x(num_rows)
    layer = Linear(weight, bias, prepack=True, single_row=single_row)  # type: ignore[arg-type]
    assert (layer.dense is not None) == (single_row != "packed")
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_in", [64, 576, 1536, 100])  # whole blocks of 64, blocks of 16, a scalar tail
def test_the_kernel_matches_torch_in_float32(kernel: RowProduct, num_in: int) -> None:
    weight, bias, x = weight_bias_x(1, num_out=200, num_in=num_in)
    torch.testing.assert_close(kernel(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernel(x, weight, None), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_the_kernel_matches_torch_in_bfloat16(kernel: RowProduct) -> None:
    weight, bias, x = (t.bfloat16() for t in weight_bias_x(1, num_out=300, num_in=576))
    expected = F.linear(x.float(), weight.float(), bias.float())  # what bfloat16 inputs give in float32
    got = kernel(x, weight, bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=5e-2)


def test_a_row_is_bit_identical_whatever_rows_come_with_it(kernel: RowProduct) -> None:
    weight, bias, x = weight_bias_x(9, num_out=130, num_in=600)
    together = kernel(x, weight, bias)
    for i in range(9):
        assert torch.equal(kernel(x[i : i + 1], weight, bias), together[i : i + 1])


def test_the_kernel_rejects_mismatched_inputs(kernel: RowProduct) -> None:
    weight, bias, x = weight_bias_x(1)
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and w \\[N, K\\]"):
        kernel(x[:, :10], weight, bias)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel(x.double(), weight, bias)
    with pytest.raises(RuntimeError, match="bias \\[N\\]"):
        kernel(x, weight, bias[:5])


@needs_prepack
def test_the_single_row_timing_picks_a_form_the_layer_can_keep() -> None:
    weight, _, _ = weight_bias_x(1, num_out=256)
    layer = Linear(weight, prepack=True, single_row="dense")
    forms = single_row_forms(torch.float32, torch.device("cpu"), prepack=True)
    assert set(forms) >= {"dense", "packed"}
    form = fastest_single_row_form(layer, forms)
    assert form in forms
    layer.use_single_row(form)
    torch.testing.assert_close(layer(weight[:1, :64]), F.linear(weight[:1, :64], weight))
    layer.use_single_row("packed")
    assert layer.dense is None
    with pytest.raises(ValueError, match="plain weight"):
        fastest_single_row_form(layer, forms)
    with pytest.raises(ValueError, match="no longer holds"):
        layer.use_single_row("dense")


def test_bfloat16_never_times_torch_s_plain_product_when_packing_works() -> None:
    """F.linear repacks a bfloat16 weight on every call: never the fastest, so never timed."""
    assert "dense" not in single_row_forms(torch.bfloat16, torch.device("cpu"), prepack=True)
    assert single_row_forms(torch.float32, torch.device("cuda"), prepack=False) == ["dense"]
