"""The linear layer's two forms agree, whichever one a machine's timing picks for single rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.linear import Linear, dense_is_faster_at_one_row, prepack_works

needs_prepack = pytest.mark.skipif(
    not prepack_works(torch.float32, torch.device("cpu")), reason="this torch build has no oneDNN packed linear"
)


@needs_prepack
@pytest.mark.parametrize("keep_dense", [True, False])
@pytest.mark.parametrize("num_rows", [1, 3, 17])
def test_packed_and_dense_forms_give_the_same_product(keep_dense: bool, num_rows: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(num_rows, 64, generator=generator)
    layer = Linear(weight, bias, prepack=True, keep_dense=keep_dense)
    assert (layer.dense is not None) == keep_dense
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)


@needs_prepack
def test_the_single_row_timing_needs_both_forms_and_keeps_the_chosen_one() -> None:
    weight = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    layer = Linear(weight, prepack=True, keep_dense=True)
    assert isinstance(dense_is_faster_at_one_row(layer), bool)
    layer.drop_dense()
    assert layer.dense is None and layer.packed is not None
    with pytest.raises(ValueError, match="both forms"):
        dense_is_faster_at_one_row(layer)
