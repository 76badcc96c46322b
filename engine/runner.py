"""One engine step: prefill chunks, draft, verify in one batched forward, accept."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
import torch

from engine.drafters.base import Draft, Drafter, DraftRequest
from engine.kv_cache import KVCache, KVCacheFullError, RegionAllocator
from engine.model.transformer import ForwardBatch, SeqInput, Transformer
from engine.protocol import (
    BatchShape,
    DraftRun,
    FinishReason,
    NewRequest,
    Offer,
    OfferOutcome,
    RequestOutput,
    ScheduledRequest,
    StepPlan,
    StepResult,
    StepTimings,
    max_draft_len,
)
from engine.sequence import Sequence
from engine.verify import accept_matching, verify_sampled


@dataclass(slots=True)
class _Work:
    """One scheduled request within the step being built."""

    seq: Sequence
    query_token_ids: list[int]  # fed to the model this step
    draft: Draft
    num_logits: int  # logit rows it needs: 0 mid-prefill, 1 at prefill end, 1 + k when decoding
    drafter: Drafter | None = None  # who drafts for it this step (decoding with k > 0 only)


class ModelRunner:
    """Owns the model, the KV cache, the drafters and every running request's sequence."""

    def __init__(self, model: Transformer, kv_cache: KVCache, drafters: list[Drafter], max_draft_tokens: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.allocator = RegionAllocator(kv_cache.capacity_tokens)
        self.drafters = {drafter.name: drafter for drafter in drafters}  # in the order of their offers
        self.max_draft_tokens = max_draft_tokens
        self.seqs: dict[str, Sequence] = {}

    @property
    def max_model_len(self) -> int:
        return self.model.spec.max_position_embeddings

    def add_request(self, new: NewRequest) -> None:
        num_tokens = len(new.prompt_token_ids) + new.max_new_tokens
        if not new.prompt_token_ids or new.max_new_tokens <= 0:
            raise ValueError(f"request {new.req_id!r} needs a prompt and max_new_tokens > 0")
        if num_tokens > self.max_model_len:
            raise ValueError(
                f"request {new.req_id!r} needs {num_tokens} tokens, the model's limit is {self.max_model_len}"
            )
        region = self.allocator.allocate(new.req_id, num_tokens, self.kv_cache)
        self.seqs[new.req_id] = Sequence(
            req_id=new.req_id,
            token_ids=list(new.prompt_token_ids),
            num_prompt_tokens=len(new.prompt_token_ids),
            max_new_tokens=new.max_new_tokens,
            sampling=new.sampling,
            stop_token_ids=frozenset(new.stop_token_ids),
            region=region,
        )
        try:
            for drafter in self.drafters.values():
                drafter.add_request(new.req_id, self.seqs[new.req_id].token_ids, num_tokens)
        except KVCacheFullError:
            self.remove_request(new.req_id)
            raise

    def remove_request(self, req_id: str) -> None:
        if self.seqs.pop(req_id, None) is not None:
            self.allocator.free(req_id)
            for drafter in self.drafters.values():
                drafter.remove_request(req_id)

    @torch.inference_mode()
    def step(self, plan: StepPlan, idle_s: float = 0.0) -> StepResult:
        """Runs one plan. idle_s: how long the engine waited for it (reported back for overhead)."""
        started = time.perf_counter()
        for req_id in plan.finished_req_ids:
            self.remove_request(req_id)
        errors: dict[str, str] = {}
        for new in plan.new_requests:
            try:
                self.add_request(new)
            except (KVCacheFullError, ValueError) as exc:
                errors[new.req_id] = str(exc)
        for s in plan.scheduled:
            if s.drafter and s.drafter not in self.drafters and s.req_id in self.seqs:
                errors[s.req_id] = f"unknown drafter {s.drafter!r}; the engine has {', '.join(self.drafters) or 'none'}"
                self.remove_request(s.req_id)
        outputs = [
            RequestOutput(s.req_id, finish_reason=FinishReason.ERROR, error=errors.get(s.req_id, "unknown request"))
            for s in plan.scheduled
            if s.req_id not in self.seqs
        ]
        works = [self._plan_work(self.seqs[s.req_id], s) for s in plan.scheduled if s.req_id in self.seqs]
        draft_runs = self._draft(works)
        drafted = forwarded = time.perf_counter()
        batch, emitted = None, []
        if works:
            batch = self._forward_batch(works)
            hidden = self.model.hidden_states(batch, self.kv_cache)
            logits = self.model.weights.lm_head(hidden)
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)  # so forward_s is the forward's own time
            forwarded = time.perf_counter()
            emitted = self._sample(works, logits)
            self._keep_hidden(works, emitted, hidden)
        sampled = time.perf_counter()
        advanced = [self._advance(work, tokens) for work, tokens in zip(works, emitted, strict=True)]
        wanted = {s.req_id for s in plan.scheduled if s.wants_offers}
        outputs += self._with_offers(advanced, wanted, plan.sure_match_lens)
        return StepResult(
            step_id=plan.step_id,
            outputs=outputs,
            timings=StepTimings(
                draft_s=sum(run.seconds for run in draft_runs),
                forward_s=forwarded - drafted,
                sample_s=sampled - forwarded,
                step_s=time.perf_counter() - started,
                idle_s=idle_s,
            ),
            shape=batch.shape() if batch else BatchShape(),
            draft_runs=draft_runs,
            finished_at_s=time.monotonic(),
        )

    def _drafter_of(self, scheduled: ScheduledRequest) -> Drafter | None:
        """The drafter the plan names (step() has failed requests naming one it lacks), or the
        first; None when the engine has none."""
        if scheduled.drafter:
            return self.drafters[scheduled.drafter]
        return next(iter(self.drafters.values()), None)

    def _plan_work(self, seq: Sequence, scheduled: ScheduledRequest) -> _Work:
        if seq.is_prefilling:
            num_left = seq.num_prompt_tokens - seq.num_computed_tokens
            num_tokens = min(max(scheduled.num_prompt_tokens, 1), num_left)
            start = seq.num_computed_tokens
            is_last_chunk = num_tokens == num_left
            return _Work(seq, seq.token_ids[start : start + num_tokens], Draft(), int(is_last_chunk))
        num_draft = min(scheduled.num_draft_tokens, max_draft_len(self.max_draft_tokens, seq.num_new_tokens_left))
        drafter = self._drafter_of(scheduled) if num_draft else None
        return _Work(seq, [seq.token_ids[-1]], Draft(), 1 + num_draft if drafter else 1, drafter)

    def _draft(self, works: list[_Work]) -> list[DraftRun]:
        """Runs each drafter once, over the decoding requests assigned to it; a drafter with a KV
        cache of its own also sees every prefill chunk, so it prefills in the same steps."""
        runs = []
        for drafter in self.drafters.values():
            involved = [w for w in works if w.drafter is drafter or (drafter.sees_prefill and w.seq.is_prefilling)]
            if not involved:
                continue
            started = time.perf_counter()
            requests = [
                draft_request(w.seq, 0, w.seq.num_computed_tokens + len(w.query_token_ids))
                if w.seq.is_prefilling
                else draft_request(w.seq, w.num_logits - 1, len(w.seq.token_ids))
                for w in involved
            ]
            num_drafting = 0
            for work, draft in zip(involved, drafter.propose(requests), strict=True):
                if work.seq.is_prefilling:
                    continue
                num_drafting += 1
                if draft.token_ids:
                    work.draft = draft
                    work.query_token_ids = work.query_token_ids + draft.token_ids
                work.num_logits = 1 + len(draft.token_ids)
            forwards = drafter.take_forwards()
            if forwards and self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)  # so the time holds a draft model's queued work
            runs.append(DraftRun(drafter.name, time.perf_counter() - started, num_drafting, forwards))
        return runs

    def _forward_batch(self, works: list[_Work]) -> ForwardBatch:
        inputs = [SeqInput(w.query_token_ids, w.seq.kv_start, w.seq.num_computed_tokens, w.num_logits) for w in works]
        return ForwardBatch.of(inputs, self.model.device)

    def _sample(self, works: list[_Work], logits: torch.Tensor) -> list[list[int]]:
        """logits: [N, V], the rows of every work in order -> the tokens each work emits."""
        is_any_greedy = any(w.seq.sampling.is_greedy for w in works if w.num_logits)
        # max(...).indices is 2.5x faster than argmax on the CPU; exact ties do not occur in practice.
        argmaxes = logits.float().max(dim=-1).indices.tolist() if is_any_greedy else []
        emitted: list[list[int]] = []
        row = 0
        for work in works:
            rows = slice(row, row + work.num_logits)
            row += work.num_logits
            if work.num_logits == 0:
                emitted.append([])
            elif work.seq.sampling.is_greedy:
                emitted.append(accept_matching(work.draft.token_ids, argmaxes[rows]))
            else:
                first_position = len(work.seq.token_ids)
                emitted.append(
                    verify_sampled(
                        logits[rows], work.draft.token_ids, work.draft.probs, work.seq.sampling, first_position
                    )
                )
        return emitted

    def _keep_hidden(self, works: list[_Work], emitted: list[list[int]], hidden: torch.Tensor) -> None:
        """hidden: [N, hidden], the rows of every work in order. Each sequence that emitted keeps
        the row that produced its last token: the one after its accepted drafts (a view; the step's
        tensor is small)."""
        row = 0
        for work, tokens in zip(works, emitted, strict=True):
            if tokens:
                work.seq.last_hidden = hidden[row + len(tokens) - 1]
            row += work.num_logits

    def _advance(self, work: _Work, emitted: list[int]) -> RequestOutput:
        """Commits a step's tokens to the sequence; rejected drafts roll back by not counting them."""
        seq = work.seq
        outcomes = [] if seq.is_prefilling else self._offer_outcomes(work, emitted)
        num_drafted = len(work.draft.token_ids)
        num_accepted = max(len(emitted) - 1, 0) if num_drafted else 0
        if seq.is_prefilling:
            seq.num_computed_tokens += len(work.query_token_ids)
        else:
            seq.num_computed_tokens += 1 + num_accepted
        emitted = emitted[: seq.num_new_tokens_left]
        finish_reason = FinishReason.NONE
        for i, token_id in enumerate(emitted):
            if token_id in seq.stop_token_ids:
                emitted, finish_reason = emitted[: i + 1], FinishReason.EOS
                break
        seq.token_ids.extend(emitted)
        if finish_reason == FinishReason.NONE and seq.num_new_tokens_left <= 0:
            finish_reason = FinishReason.LENGTH
        if work.drafter is not None:
            work.drafter.observe(seq.req_id, num_drafted, num_accepted)
        if finish_reason != FinishReason.NONE:
            self.remove_request(seq.req_id)
        return RequestOutput(seq.req_id, emitted, num_drafted, num_accepted, finish_reason, offer_outcomes=outcomes)

    def _offer_outcomes(self, work: _Work, emitted: list[int]) -> list[OfferOutcome]:
        """How the offers of the drafters that did not draft for the request this step would have
        fared against the tokens it emitted (before they join the sequence)."""
        seq, outcomes = work.seq, []
        for drafter in self.drafters.values():
            if drafter is work.drafter:
                continue
            offered = drafter.offered_tokens(seq.req_id, len(seq.token_ids), seq.sampling)
            num_tested = min(len(offered), len(emitted))
            if num_tested:
                num_passed = next((i for i in range(num_tested) if offered[i] != emitted[i]), num_tested)
                outcomes.append(OfferOutcome(drafter.name, num_tested, num_passed))
        return outcomes

    def _with_offers(
        self, outputs: list[RequestOutput], wanted: set[str], sure_match_lens: Mapping[str, int]
    ) -> list[RequestOutput]:
        """Each continuing request's outputs with every drafter's offer for its next step, one call
        per drafter over the batch; a request that emitted nothing (a prefill chunk), may not draft
        any more, or whose plans do not want offers gets empty ones, a finished one none. Drafters
        whose offers cost nothing offer first; one whose offers run a model then skips the
        requests they made a sure offer to (StepPlan.sure_match_lens), which gets an empty one."""
        asking = []
        for out in outputs:
            seq = self.seqs.get(out.req_id)
            max_k = max_draft_len(self.max_draft_tokens, seq.num_new_tokens_left) if seq else 0
            is_asking = out.req_id in wanted and out.new_token_ids and out.finish_reason == FinishReason.NONE
            if seq and max_k > 0 and is_asking:
                asking.append(draft_request(seq, max_k, len(seq.token_ids)))
        offers_by_drafter: dict[str, dict[str, Offer]] = {}
        sure: set[str] = set()
        for drafter in sorted(self.drafters.values(), key=lambda d: d.offers_run_model):
            asked = [r for r in asking if r.req_id not in sure] if drafter.offers_run_model else asking
            offers = dict(zip([r.req_id for r in asked], drafter.offers(asked), strict=True)) if asked else {}
            offers_by_drafter[drafter.name] = offers
            if sure_len := sure_match_lens.get(drafter.name, 0):
                sure |= {req_id for req_id, offer in offers.items() if offer.num_tokens and offer.match_len >= sure_len}
        return [
            out
            if out.finish_reason != FinishReason.NONE
            else msgspec.structs.replace(
                out, offers=[offers_by_drafter[name].get(out.req_id, Offer()) for name in self.drafters]
            )
            for out in outputs
        ]


def draft_request(seq: Sequence, num_draft_tokens: int, num_visible: int) -> DraftRequest:
    """The sequence as a drafter sees it (DraftRequest says what each field means)."""
    return DraftRequest(
        seq.req_id, seq.token_ids, num_draft_tokens, num_visible, seq.sampling, seq.kv_start, seq.last_hidden
    )
