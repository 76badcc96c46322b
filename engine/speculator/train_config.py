"""The settings of a speculator training run (no torch here: the command line reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TrainConfig:
    model: str
    num_heads: int = 3
    num_classes: int = 4096  # the target tokens the heads name (the most frequent in the corpus), plus "other"
    inner_dim: int = 0  # 0: the target's hidden size
    dtype: str = "bfloat16"  # the target's, while it reads code and writes (the heads train in float32)
    chunk_tokens: int = 256
    num_code_chunks: int = 1200  # stage 1 data: chunks of chunk_tokens
    num_held_out_chunks: int = 64
    num_prompts: int = 2560  # stage 2 data: generations of new_tokens each
    num_held_out_prompts: int = 32
    prompt_tokens: int = 64
    new_tokens: int = 192
    generation_batch: int = 32
    stage1_steps: int = 750
    stage2_steps: int = 1200
    batch_records: int = 8  # records per training step
    learning_rate: float = 1e-3
    # start the heads from the target's embeddings and identity projections (experimental)
    warm_start: bool = False
    seed: int = 0
    time_budget_s: float = 3600.0

    def __post_init__(self) -> None:
        positive = (
            "num_heads",
            "num_classes",
            "chunk_tokens",
            "num_code_chunks",
            "num_held_out_chunks",
            "num_prompts",
            "num_held_out_prompts",
            "prompt_tokens",
            "new_tokens",
            "generation_batch",
            "batch_records",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stage1_steps < 0 or self.stage2_steps < 0:
            raise ValueError("stage1_steps and stage2_steps must be >= 0")
        if self.inner_dim < 0:
            raise ValueError(f"inner_dim must be 0 (the model's hidden size) or positive, got {self.inner_dim}")
        if self.chunk_tokens <= self.num_heads + 1 or self.new_tokens <= self.num_heads:
            raise ValueError("chunk_tokens and new_tokens must exceed num_heads + 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not (self.learning_rate > 0 and self.time_budget_s > 0):
            raise ValueError("learning_rate and time_budget_s must be positive")
