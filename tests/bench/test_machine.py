"""Where figures were taken: the machine facts every benchmark saves, and the roofline it reports."""

from __future__ import annotations

import torch

from bench.machine import KERNEL_FLAGS, machine_facts
from bench.roofline import roofline_tokens_per_s
from engine.model.spec import ModelSpec


def test_machine_facts_name_the_cpu_its_kernel_flags_and_a_measured_bandwidth() -> None:
    facts = machine_facts()
    assert facts["cpu_model"] and set(facts["cpu_flags"]) <= set(KERNEL_FLAGS)
    assert 0.1 < facts["memory_bandwidth_gbs"] < 10_000 and facts["torch_threads"] >= 1


def test_the_roofline_reads_every_weight_matrix_once_per_token() -> None:
    # SmolLM2-135M's shape: 30 layers of 576 wide, 9 query and 3 KV heads of 64, MLP 1536, 49,152 tokens
    spec = ModelSpec("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 8192, False, True)
    per_layer = 576 * 15 * 64 + 576 * 576 + 3 * 576 * 1536  # qkv, o, gate-up and down
    num_params = 30 * per_layer + 49152 * 576
    assert num_params == 134_479_872  # the model's 134.5M parameters: every matrix, the tied output layer once
    assert roofline_tokens_per_s(spec, torch.float32, 40.0) == 40e9 / (4 * num_params)
    assert roofline_tokens_per_s(spec, torch.bfloat16, 40.0) == 2 * roofline_tokens_per_s(spec, torch.float32, 40.0)
