"""Linear layers, with weights prepacked for oneDNN on the CPU.

On a CPU, `F.linear` repacks a bfloat16 weight on every call, and float32 products of a few rows
run at a fraction of the machine's speed. For the skinny products of decoding and verification
(1 to 17 rows) a prepacked weight fixes both: bfloat16 at one row gets about 1.5x faster, and
float32 with 9 rows costs about 1.3x one row instead of 2.3x. That is what makes verifying k
draft tokens cheap enough to pay off. For a single float32 row it depends on the CPU: on some,
MKL's plain product is the fastest, on others (seen on AMD EPYC) it takes twice the packed
product's time. So the loader times both once (`dense_is_faster_at_one_row`) and keeps the dense
form only where it wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# The number of rows oneDNN picks its packed layout for; the layout serves other row counts too.
PACK_FOR_NUM_ROWS = 16


class Linear:
    """y = x @ weight.T + bias over [T, in] -> [T, out]."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = False, keep_dense: bool = True
    ) -> None:
        # weight: [out, in]; bias: [out] or None. keep_dense: with prepack, also keep the plain
        # weight for single rows (see dense_is_faster_at_one_row).
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.dense: torch.Tensor | None = weight
        if prepack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_FOR_NUM_ROWS)
            if not keep_dense:
                self.dense = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and (self.dense is None or x.shape[0] > 1):
            return self.packed_product(x)
        assert self.dense is not None  # one of the two forms always exists
        return F.linear(x, self.dense, self.bias)

    def packed_product(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            raise ValueError("this layer has no prepacked form")
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out

    def drop_dense(self) -> None:
        """Keeps only the packed form (once timing has shown the plain one no faster)."""
        if self.packed is not None:
            self.dense = None


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


def dense_is_faster_at_one_row(layer: Linear, repeats: int = 9) -> bool:
    """Times one row through the layer's plain and prepacked forms (a decode step's shape): True
    when the plain product is at least 10% faster on this machine. The layer holds both forms."""
    weight = layer.dense
    if weight is None or layer.packed is None:
        raise ValueError("dense_is_faster_at_one_row needs a layer with both forms (prepack=True, keep_dense=True)")
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)

    def median_s(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        fn(x)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - started)
        return sorted(times)[repeats // 2]

    with torch.inference_mode():
        dense_s = median_s(lambda x: F.linear(x, weight, layer.bias))
        return dense_s < 0.9 * median_s(layer.packed_product)
