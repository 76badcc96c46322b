"""Builds our Transformer from a transformers checkpoint directory (or hub id)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.model.linear import MAX_KERNEL_ROWS
from engine.model.row_limit import fit_kernel_row_limit, recall_limit, store_limit, stored_limit_path
from engine.model.spec import ModelSpec
from engine.model.transformer import Transformer
from engine.model.weights import from_hf_model


def load_transformer(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    show_progress: bool = True,
    kernel_row_limit: int | None = None,
    keep_row_limit: bool = False,
) -> Transformer:
    """Loads the weights through transformers, then keeps only the rearranged tensors.
    show_progress=False hides transformers' "Loading weights" bar. kernel_row_limit: up to how many
    rows products run in our kernel; None: as an earlier load kept it (with keep_row_limit), else
    timed now (row_limit.py), and kept with keep_row_limit."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(str(path))
    spec = ModelSpec.from_hf_config(config)  # fails early, before reading weights, on other families
    # The switch is global in transformers, so it is put back for other loads in this process.
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not show_progress:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    finally:
        if was_enabled and not show_progress:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    weights = from_hf_model(hf_model, spec, dtype, device)
    del hf_model
    model = Transformer(spec, weights)
    # no kernel products (CUDA, or kernels that would not build): nothing to time or keep
    kept = (
        stored_limit_path(spec, dtype, torch.get_num_threads())
        if keep_row_limit and model.has_kernel_products
        else None
    )
    if kernel_row_limit is None and kept is not None:
        kernel_row_limit = recall_limit(kept)
    if kernel_row_limit is None:
        fit_kernel_row_limit(model)
        if kept is not None:
            store_limit(kept, model.kernel_row_limit)
    elif model.has_kernel_products:
        model.set_kernel_rows(min(kernel_row_limit, MAX_KERNEL_ROWS), free_unused=True)
    return model
