"""The linear layer's kernel agrees with torch's products and computes each row the same way
however many rows come with it; the loader's timing picks a row limit the layer can use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.linear import (
    MAX_KERNEL_ROWS,
    FewRowsProduct,
    Linear,
    few_rows_linear,
    prepack_works,
    weight_blocks,
)
from tests.engine.cpu_kernels import require_cpu_kernels

needs_prepack = pytest.mark.skipif(
    not prepack_works(torch.float32, torch.device("cpu")), reason="this torch build has no oneDNN packed linear"
)


@pytest.fixture(scope="module")
def kernel() -> FewRowsProduct:
    require_cpu_kernels()
    built = few_rows_linear()
    assert built is not None
    return built


def weight_bias_x(num_rows: int, num_out: int = 96, num_in: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_out, num_in, generator=generator)
    bias = torch.randn(num_out, generator=generator)
    return weight, bias, torch.randn(num_rows, num_in, generator=generator)


@needs_prepack
@pytest.mark.parametrize("max_kernel_rows", [0, 4])
@pytest.mark.parametrize("num_rows", [0, 1, 3, 17])
def test_every_path_gives_the_same_product(kernel: FewRowsProduct, max_kernel_rows: int, num_rows: int) -> None:
    weight, bias, x = weight_bias_x(num_rows)
    layer = Linear(weight, bias, prepack=True, max_kernel_rows=max_kernel_rows)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prepack", [False, pytest.param(True, marks=needs_prepack)])
def test_no_rows_give_an_empty_product_without_the_kernel(prepack: bool) -> None:
    """A step whose prefill chunks end no prompt asks the output layer for no rows. Where oneDNN
    won from one row (an AMD EPYC with AVX2 only), the limit is 0 and the kernel's copy is gone."""
    weight, bias, x = weight_bias_x(0)
    layer = Linear(weight, bias, prepack=prepack)
    assert layer(x).shape == (0, 96)


def test_an_unpacked_bfloat16_product_is_summed_in_float32() -> None:
    """Without a packed form (no AVX-512 there), bfloat16 products widen the weight to float32:
    2.5-8x faster than torch's bfloat16 product on such a CPU, and summed more exactly."""
    weight, bias, x = (t.bfloat16() for t in weight_bias_x(17))
    got = Linear(weight, bias)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(x.float(), weight.float(), bias.float()).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("num_out", [64, 200, 49])  # whole blocks, a padded last block, less than one
@pytest.mark.parametrize("num_rows", [1, 7, 13])  # one pass of up to 6 rows, several
def test_the_kernel_matches_torch_in_float32(kernel: FewRowsProduct, num_out: int, num_rows: int) -> None:
    weight, bias, x = weight_bias_x(num_rows, num_out=num_out, num_in=576)
    blocks = weight_blocks(weight)
    torch.testing.assert_close(kernel(x, blocks, num_out, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernel(x, blocks, num_out, None), F.linear(x, weight), rtol=1e-5, atol=1e-4)


# with AVX2: passes of 4 vectors; groups of 6 in passes of 2; with AMX: three tiles of rows, the last of 5
@pytest.mark.parametrize("num_rows", [3, 13, 37])
@pytest.mark.parametrize("num_in", [576, 37])  # bfloat16 pairs along k: an odd k is padded with a zero
def test_the_kernel_matches_torch_in_bfloat16(kernel: FewRowsProduct, num_rows: int, num_in: int) -> None:
    weight, bias, x = (t.bfloat16() for t in weight_bias_x(num_rows, num_out=300, num_in=num_in))
    expected = F.linear(x.float(), weight.float(), bias.float())  # what bfloat16 inputs give in float32
    blocks = weight_blocks(weight)
    assert blocks.shape == (5, num_in + num_in % 2, 64)
    got = kernel(x, blocks, 300, bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=5e-2)


def test_bfloat16_blocks_hold_each_outputs_weights_in_pairs_along_k() -> None:
    """The layout the bfloat16 dot product reads: block b, pair p, output n -> (w[n, 2p], w[n, 2p + 1])."""
    weight = torch.arange(70 * 5, dtype=torch.float32).view(70, 5).bfloat16()  # exact in bfloat16
    pairs = weight_blocks(weight).view(2, 3, 64, 2)
    assert torch.equal(pairs[1, 2, 3], torch.tensor([weight[67, 4].item(), 0.0], dtype=torch.bfloat16))  # k padded
    assert torch.equal(pairs[0, 1, 10], weight[10, 2:4])
    assert torch.equal(pairs[1, 0, 6:], torch.zeros(58, 2, dtype=torch.bfloat16))  # outputs past 70


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16 weights load in pairs of vectors
@pytest.mark.parametrize("num_in", [600, 576])  # bfloat16 with AMX: tiles of 16 rows where k is a multiple of 32
def test_a_row_is_bit_identical_whatever_rows_come_with_it(
    kernel: FewRowsProduct, dtype: torch.dtype, num_in: int
) -> None:
    """What keeps greedy speculation exact: a decode step's row and the same row among drafts."""
    weight, bias, x = (t.to(dtype) for t in weight_bias_x(40, num_out=130, num_in=num_in))
    blocks = weight_blocks(weight)
    together = kernel(x, blocks, 130, bias)
    for i in range(40):
        assert torch.equal(kernel(x[i : i + 1], blocks, 130, bias), together[i : i + 1])
    assert torch.equal(kernel(x[3:19], blocks, 130, bias), together[3:19])
    for n in range(2, 40):  # groups of 6 rows (or tiles of 16) and every rest, each in its own passes
        assert torch.equal(kernel(x[:n], blocks, 130, bias), together[:n])


def test_the_kernel_rejects_mismatched_inputs(kernel: FewRowsProduct) -> None:
    weight, bias, x = weight_bias_x(1)
    blocks = weight_blocks(weight)
    with pytest.raises(RuntimeError, match="blocks \\[ceil\\(N / 64\\), K, 64\\]"):
        kernel(x[:, :10], blocks, 96, bias)
    with pytest.raises(RuntimeError, match="N fits the blocks"):
        kernel(x, blocks, 200, bias)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel(x.double(), blocks, 96, bias)
    with pytest.raises(RuntimeError, match="bias \\[N\\]"):
        kernel(x, blocks, 96, bias[:5])


@needs_prepack
def test_a_row_limit_the_layer_keeps_and_frees(kernel: FewRowsProduct) -> None:
    weight, _, _ = weight_bias_x(1, num_out=256)
    layer = Linear(weight, prepack=True, max_kernel_rows=MAX_KERNEL_ROWS)
    x = weight[:4, :64]
    for limit in (4, 2, 0, MAX_KERNEL_ROWS):  # raised again while the kernel's copy is kept
        layer.set_kernel_rows(limit)
        assert layer.max_kernel_rows == limit
        torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=1e-4, atol=1e-4)
    layer.free_kernel()
    assert layer.blocks is None and layer.max_kernel_rows == 0
    torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="freed"):
        layer.set_kernel_rows(1)
