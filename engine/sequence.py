"""The engine's state of one running request (nano-vllm's name for it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache import Region
from engine.protocol import SamplingParams


@dataclass(slots=True)
class Sequence:
    """A running request as the engine holds it: its tokens and how many have K/V in the cache."""

    req_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    region: Region  # its rows of the KV cache; compaction may move them, so read the start from here
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # [hidden]: the target's final-norm hidden state that produced the last token (an MLP
    # speculator drafts from it); None until the first token is generated
    last_hidden: torch.Tensor | None = None

    @property
    def kv_start(self) -> int:
        return self.region.start

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def num_new_tokens_left(self) -> int:
        return self.max_new_tokens - (len(self.token_ids) - self.num_prompt_tokens)
