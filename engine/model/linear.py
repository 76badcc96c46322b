"""Linear layers, with weights prepacked for oneDNN on the CPU, and a kernel of our own for a
single row.

On a CPU, `F.linear` repacks a bfloat16 weight on every call, and float32 products of a few rows
run at a fraction of the machine's speed. For the skinny products of verification and batched
decoding (2 to 17 rows) a prepacked weight fixes both: bfloat16 at one row gets about 1.5x faster,
and float32 with 9 rows costs about 1.3x one row instead of 2.3x. That is what makes verifying k
draft tokens cheap enough to pay off.

A single row (a batch-1 decode step) is a matrix-vector product, bound by reading the weight.
There the engine's own kernel (csrc/cpu_linear.cpp) streams each weight row in order and reached
1.2-1.8x oneDNN's packed product and 1.5-3x MKL's plain one on an AMD EPYC (float32 and bfloat16,
the default model's shapes). Which form is fastest at one row depends on the CPU, so the loader
times the three once (`fastest_single_row_form`) and keeps what it needs for the winner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from engine.model.cpu_kernels import cpu_kernels_built

# The number of rows oneDNN picks its packed layout for; the layout serves other row counts too.
PACK_FOR_NUM_ROWS = 16

SingleRowForm = Literal["kernel", "dense", "packed"]
RowProduct = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def row_linear() -> RowProduct | None:
    """The single-row kernel (torch.ops.goodspeed.row_linear), or None where it cannot be built."""
    if not cpu_kernels_built():
        return None
    kernel: RowProduct = torch.ops.goodspeed.row_linear
    return kernel


class Linear:
    """y = x @ weight.T + bias over [T, in] -> [T, out]."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        prepack: bool = False,
        single_row: SingleRowForm = "dense",
    ) -> None:
        # weight: [out, in]; bias: [out] or None. single_row: the form for one row (the packed
        # one needs prepack); the plain weight is kept unless it is "packed".
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.dense: torch.Tensor | None = weight
        self.row_product: RowProduct | None = None
        if prepack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_FOR_NUM_ROWS)
        self.use_single_row(single_row)

    def use_single_row(self, form: SingleRowForm) -> None:
        """Products of one row run in this form from now on; "packed" drops the plain weight."""
        if form == "packed":
            if self.packed is None:
                raise ValueError("this layer has no prepacked form")
            self.dense = None
        elif self.dense is None:
            raise ValueError("this layer no longer holds the plain weight")
        self.row_product = row_linear() if form == "kernel" else None
        if form == "kernel" and self.row_product is None:
            raise ValueError("the CPU kernels are not built here")
        self.single_row = form

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and (self.single_row == "packed" or x.shape[0] > 1):
            return self.packed_product(x)
        assert self.dense is not None  # kept for every form but "packed"
        if x.shape[0] == 1 and self.row_product is not None:
            return self.row_product(x, self.dense, self.bias)
        return F.linear(x, self.dense, self.bias)

    def packed_product(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            raise ValueError("this layer has no prepacked form")
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out


def prepack_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Checks once that this torch build's packed path runs and agrees with F.linear."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    try:
        weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
        got = Linear(weight, prepack=True)(x).float()
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.allclose(got, F.linear(x, weight).float(), rtol=2e-2, atol=2e-2))


def single_row_forms(dtype: torch.dtype, device: torch.device, prepack: bool) -> list[SingleRowForm]:
    """The forms worth timing for one row: F.linear repacks a bfloat16 weight on every call."""
    forms: list[SingleRowForm] = []
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and row_linear() is not None:
        forms.append("kernel")
    if dtype == torch.float32 or not prepack:
        forms.append("dense")
    if prepack:
        forms.append("packed")
    return forms


def fastest_single_row_form(layer: Linear, forms: Sequence[SingleRowForm], repeats: int = 9) -> SingleRowForm:
    """Times one row (a decode step's shape) through each form of a layer that holds the plain
    weight (and the packed one, if "packed" is among the forms); the fastest by median."""
    weight = layer.dense
    if weight is None:
        raise ValueError("fastest_single_row_form needs a layer that holds the plain weight")
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    products: dict[SingleRowForm, Callable[[], torch.Tensor]] = {
        "kernel": lambda: torch.ops.goodspeed.row_linear(x, weight, layer.bias),
        "dense": lambda: F.linear(x, weight, layer.bias),
        "packed": lambda: layer.packed_product(x),
    }

    if len(forms) == 1:
        return forms[0]
    times: dict[SingleRowForm, list[float]] = {form: [] for form in forms}
    with torch.inference_mode():
        for form in forms:
            products[form]()  # warm-up
        for _ in range(repeats):  # taking turns, so a slow spell of the machine hits every form
            for form in forms:
                started = time.perf_counter()
                products[form]()
                times[form].append(time.perf_counter() - started)
    return min(forms, key=lambda form: sorted(times[form])[repeats // 2])
