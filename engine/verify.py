"""Speculative verification: which draft tokens the target accepts, and the token after them.

Terms follow vLLM: drafted tokens are *accepted* while the target agrees; at the first
disagreement the target's own token is emitted (*recovered*); if every draft token is accepted
the target's token after them comes for free (*bonus*). Each step therefore emits between 1 and
k + 1 tokens, and the output follows the target model exactly (Leviathan et al., arXiv 2211.17192).
"""

from __future__ import annotations

import torch

from engine.protocol import SamplingParams
from engine.sampling import logits_to_probs, position_noise, sample


def accept_matching(draft_ids: list[int], target_ids: list[int]) -> list[int]:
    """Accept while the draft equals the target's token; returns accepted + recovered/bonus tokens.

    target_ids has one more entry than draft_ids. With greedy decoding target_ids are the argmaxes.
    With sampling and a model-free (one-hot) draft they are tokens sampled from the target, which
    is rejection sampling with q = one-hot(draft): the draft is accepted with probability p(draft),
    and a rejected position emits a sample of p with the draft token excluded, renormalised.
    """
    emitted = []
    for draft_id, target_id in zip(draft_ids, target_ids, strict=False):
        emitted.append(target_id)
        if draft_id != target_id:
            return emitted
    emitted.append(target_ids[len(draft_ids)])
    return emitted


def rejection_sample(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_ids: torch.Tensor, noise: torch.Tensor
) -> list[int]:
    """Standard speculative sampling for a draft that has probabilities.

    target_probs: [k + 1, V]; draft_probs: [k, V] (each draft token's proposal distribution);
    draft_ids: [k]; noise: [k + 1, V + 1] from `position_noise`.
    Accept draft token x at position j when u_j < p_j(x) / q_j(x); at the first rejection emit a
    sample of normalise(max(0, p_j - q_j)); if all are accepted emit a sample of p_{k+1}.
    """
    num_draft = draft_ids.shape[0]
    rows = torch.arange(num_draft, device=draft_ids.device)
    p_draft = target_probs[rows, draft_ids]  # [k]
    q_draft = draft_probs[rows, draft_ids]  # [k]
    vocab_size = target_probs.shape[-1]
    uniform = torch.exp(-noise[:num_draft, vocab_size])  # [k]
    is_accepted = (uniform * q_draft < p_draft).tolist()
    num_accepted = is_accepted.index(False) if False in is_accepted else num_draft
    emitted = draft_ids[:num_accepted].tolist()
    if num_accepted < num_draft:
        residual = torch.clamp(target_probs[num_accepted] - draft_probs[num_accepted], min=0.0)
        emitted.append(int(sample(residual[None], noise[num_accepted : num_accepted + 1])[0]))
    else:
        emitted.append(int(sample(target_probs[num_draft:], noise[num_draft:])[0]))
    return emitted


def verify_sampled(
    logits: torch.Tensor,
    draft_ids: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    first_position: int,
) -> list[int]:
    """Verification for one sampled (temperature > 0) request.

    logits: [k + 1, V] at the positions of the last token and the k drafts; first_position is the
    position of the first token this step emits; draft_probs: [k, V] or None for one-hot drafts.
    """
    probs = logits_to_probs(logits, params)
    noise = position_noise(params.seed, first_position, probs.shape[0], probs.shape[-1], probs.device)
    if draft_probs is None:
        return accept_matching(draft_ids, sample(probs, noise).tolist())
    draft_tensor = torch.tensor(draft_ids, device=probs.device, dtype=torch.long)
    return rejection_sample(probs, draft_probs.float(), draft_tensor, noise)
