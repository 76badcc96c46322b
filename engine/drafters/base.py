"""The interface every drafter implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from engine.protocol import BatchShape, Offer, SamplingParams
from engine.sampling import logits_to_probs, mix_seed, position_noise, sample


@dataclass(frozen=True, slots=True)
class Draft:
    token_ids: list[int] = field(default_factory=list)
    # [len(token_ids), V]: the distribution each token was drawn from; None for a model-free
    # drafter, whose proposals count as one-hot distributions in verification.
    probs: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """One request of the step, as a drafter sees it: every request that prefills or drafts."""

    req_id: str
    token_ids: list[int]  # prompt and generated tokens so far (read-only)
    num_draft_tokens: int  # propose at most this many; 0 for a prefill chunk
    # token_ids[:num_visible] will be in the target's cache after this step: a prefill chunk's
    # end, or every token when decoding. A drafter with a cache of its own may feed them now.
    num_visible: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    kv_start: int = 0  # the first row of its region in the target's KV cache (for a drafter that reads it)
    # [hidden]: the target's final-norm hidden state that produced token_ids[-1] (for a drafter
    # that drafts from it); None while prefilling
    last_hidden: torch.Tensor | None = None


class Drafter(ABC):
    """Proposes up to k tokens per request and learns how many the target accepted."""

    name: str
    sees_prefill = False  # True for a drafter with a KV cache of its own: it is shown prefill chunks too
    runs_model = False  # True for one whose forwards cost time: the control plane profiles and prices them
    offers_run_model = False  # True for one that runs a model to work out its offers (see StepPlan.sure_match_lens)
    # The chance a draft token passes, for the control plane to plan with before it has seen any of
    # this drafter's drafts: a guess, which the first drafts replace.
    prior_acceptance = 0.5

    def add_request(self, req_id: str, token_ids: list[int], num_tokens: int) -> None:  # noqa: B027 - optional hook
        """A request joined the batch; token_ids is its prompt, num_tokens the most it may grow to
        (prompt + max_new_tokens: the KV rows the target reserves for it)."""

    def remove_request(self, req_id: str) -> None:  # noqa: B027 - optional hook
        """A request left; forget its state."""

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft per request, each at most num_draft_tokens long (it may be empty)."""

    def observe(self, req_id: str, num_drafted: int, num_accepted: int) -> None:  # noqa: B027
        """How many of the proposed tokens the target accepted this step."""

    def take_forwards(self) -> list[BatchShape]:
        """The shapes of the forward passes its last propose ran (a draft model's), for the control
        plane's drafting-cost model; a model-free drafter runs none."""
        return []

    def offered_tokens(self, req_id: str, num_tokens: int, sampling: SamplingParams) -> list[int]:
        """The tokens its last offer for the request, made at num_tokens tokens, would have drafted,
        where that takes no model run and the draft would be one token per position (for the
        runner to check against what the target emitted); [] where not."""
        return []

    def offer(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> Offer:
        """What a proposal for this request would be right now (at most num_draft_tokens). The
        control plane plans k with it; a model-based drafter can always propose, a model-free one
        only when it finds a match."""
        return Offer(num_draft_tokens)

    def offers(self, requests: list[DraftRequest]) -> list[Offer]:
        """offer() for each request that has just emitted (num_draft_tokens: the most it may
        draft next step), all at once: a drafter that must run a model to know what it offers
        batches it here."""
        return [self.offer(r.req_id, r.token_ids, r.num_draft_tokens) for r in requests]


def pick_draft_tokens(
    logits: torch.Tensor, picks: list[tuple[SamplingParams, int]], noise_stream: int
) -> list[tuple[int, torch.Tensor | None]]:
    """logits: [len(picks), V], row i for a request drafting the token at position picks[i][1] ->
    each one's draft token and, when sampled, the distribution [V] it was drawn from. Greedy rows
    take the argmax (one for all of them). Sampled rows draw with noise keyed by (seed salted with
    noise_stream, position): a drafter must not reuse the target's noise, or its proposals would
    be correlated with the very draws that verify them."""
    is_any_greedy = any(sampling.is_greedy for sampling, _ in picks)
    argmaxes = logits.float().max(dim=-1).indices.tolist() if is_any_greedy else []
    tokens: list[tuple[int, torch.Tensor | None]] = []
    for row, (sampling, position) in enumerate(picks):
        if sampling.is_greedy:
            tokens.append((argmaxes[row], None))
            continue
        probs = logits_to_probs(logits[row : row + 1], sampling)  # [1, V]
        noise = position_noise(mix_seed(sampling.seed, noise_stream), position, 1, probs.shape[-1], probs.device)
        tokens.append((int(sample(probs, noise)[0]), probs[0]))
    return tokens
