"""Linear layers: a kernel of our own for a few rows, oneDNN's prepacked product for more.

Decoding and verifying multiply a few rows (1 to 17 at batch 1, one per sequence in a batch) by
every weight, so a step is bound by reading the weights once. On the CPUs measured, MKL's plain
product (`F.linear`) reads them at a third of the memory's speed and repacks a bfloat16 weight on
every call, and oneDNN's prepacked one at a half to two thirds. The engine's own kernel
(csrc/cpu_linear.cpp), over the weight stored in blocks of 64 outputs, reads it at about the
memory's speed: on an AMD EPYC 1.1-1.6x oneDNN from 1 to 9 rows in float32 and from 1 to 5 in
bfloat16 on one product; in a whole step, where the kernel also lets a layer run in one call, it
wins up to 16 in float32. In bfloat16 it lost to oneDNN's dot products beyond 6 rows, until it
took them too (avx512_bf16, weights in pairs along k, `weight_blocks`): on an AVX-512 EPYC it now
wins at every row count timed, to 64. On an AMD EPYC with AVX2 only, whole passes of 1 to 16
tokens ran 1.05-1.45x faster in the kernel in float32 and 1.7-3.6x in bfloat16 (no packed
bfloat16 product there: F.linear, on a weight widened to float32 beyond the limit). The CPU
decides, so the loader times whole forward passes both ways (engine/model/row_limit.py).

The kernel computes each row the same way however many rows come with it, so a decoded token's
products are bit-identical to the same token's when verified, as long as both are within the limit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.model.cpu_kernels import cpu_kernels_built

# The number of rows oneDNN picks its packed layout for; the layout serves other row counts too.
PACK_FOR_NUM_ROWS = 16
BLOCK = 64  # outputs per block of the kernel's weight layout
# Up to 64, a batch of 16 verifying 3 drafts: the loader times whole passes up to here
# (row_limit.py). The kernel reads each 64-output block of a weight from memory once, however many
# rows, so it keeps up with oneDNN well past a few rows: on an AMD EPYC with AVX2 only, a forward
# pass of T tokens in the kernel against oneDNN's ran 3.2x / 2.6x / 2.0x / 1.2x / 1.04x faster at
# T = 16 / 24 / 64 / 256 / 512 in bfloat16 (this torch's oneDNN widens bfloat16 weights without
# AVX-512), and 1.18x / 1.13x / 1.00x / 0.91x at 16 / 24 / 64 / 256 in float32.
MAX_KERNEL_ROWS = 64

FewRowsProduct = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor | None], torch.Tensor]


def few_rows_linear() -> FewRowsProduct | None:
    """The kernel (torch.ops.goodspeed.few_rows_linear), or None where it cannot be built."""
    if not cpu_kernels_built():
        return None
    kernel: FewRowsProduct = torch.ops.goodspeed.few_rows_linear
    return kernel


def weight_blocks(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 64), K, 64], the kernel's layout (the last block padded with zeros).
    bfloat16 is stored in pairs along k, each block [K / 2, 64, 2] (K padded to even with zeros):
    an output's weights at k and k + 1 side by side, as the CPU's bfloat16 dot product takes them."""
    num_out, num_in = weight.shape
    if weight.dtype != torch.bfloat16:
        padded = F.pad(weight, (0, 0, 0, -num_out % BLOCK))
        return padded.view(-1, BLOCK, num_in).transpose(1, 2).contiguous()
    padded = F.pad(weight, (0, num_in % 2, 0, -num_out % BLOCK))
    num_blocks, num_pairs = padded.shape[0] // BLOCK, padded.shape[1] // 2
    pairs = padded.view(num_blocks, BLOCK, num_pairs, 2).permute(0, 2, 1, 3).contiguous()
    return pairs.view(num_blocks, 2 * num_pairs, BLOCK)


def kernel_fits(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and few_rows_linear() is not None


class Linear:
    """y = x @ weight.T + bias over [T, in] -> [T, out]."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = False, max_kernel_rows: int = 0
    ) -> None:
        # weight: [out, in]; bias: [out] or None. max_kernel_rows: products of up to this many
        # rows run in the kernel (0: none); the rest in the prepacked form, or F.linear without one.
        self.bias = bias
        self.num_out = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_FOR_NUM_ROWS) if prepack else None
        self.dense = None if prepack else weight
        # Without a packed form, torch's bfloat16 product on a CPU without AVX-512 ran 2.5x (17 rows)
        # to 8x (512 rows) slower than widening the weight to float32 on each call and using
        # float32's product; float32 sums exactly what bfloat16 inputs hold, so only the rounding
        # of the output to bfloat16 remains.
        self.is_widened = not prepack and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
        self.kernel = few_rows_linear() if max_kernel_rows else None
        if max_kernel_rows and self.kernel is None:
            raise ValueError("the CPU kernels are not built here")
        self.blocks = weight_blocks(weight) if max_kernel_rows else None
        self.max_kernel_rows = max_kernel_rows

    def set_kernel_rows(self, max_rows: int) -> None:
        """Products of up to max_rows rows run in the kernel (0: none), while its copy of the weight is kept."""
        if max_rows and self.blocks is None:
            raise ValueError("this layer's kernel copy of the weight was freed or never made")
        self.max_kernel_rows = max_rows

    def free_kernel(self) -> None:
        """No product runs in the kernel any more; its copy of the weight is freed."""
        self.max_kernel_rows = 0
        self.kernel = self.blocks = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # `0 <` too: a step can ask for no rows (prefill chunks that end no prompt), and with a
        # limit of 0 (oneDNN wins from one row on some CPUs) the kernel's copy is gone.
        if 0 < x.shape[0] <= self.max_kernel_rows:
            assert self.kernel is not None and self.blocks is not None  # there while max_kernel_rows > 0
            return self.kernel(x, self.blocks, self.num_out, self.bias)
        return self.fallback(x)

    def fallback(self, x: torch.Tensor) -> torch.Tensor:
        """The product without the kernel: oneDNN's prepacked one, or F.linear without it."""
        if self.packed is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return out
        assert self.dense is not None  # kept when there is no packed form
        if self.is_widened:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.dense.float(), bias).to(x.dtype)
        return F.linear(x, self.dense, self.bias)


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
