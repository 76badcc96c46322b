"""Messages between the control plane and the engine process.

msgspec structs of primitives only (no tensors, no pickle), encoded as msgpack arrays. A request's
full data crosses once, in the plan that admits it; after that a plan carries only how many
tokens each request runs this step and which requests to forget, and a result carries only the
new tokens (vLLM V1's SchedulerOutput / ModelRunnerOutput pattern). This module is shared by
both sides, so it must not import torch, grpc or anyio.
"""

from __future__ import annotations

import enum

import msgspec


class FinishReason(enum.IntEnum):
    NONE = 0  # still running
    LENGTH = 1  # max_new_tokens reached
    EOS = 2  # an end-of-sequence token was generated
    STOP = 3  # a stop sequence matched (decided by the control plane)
    CANCELLED = 4  # the client went away
    DEADLINE = 5  # the client's deadline passed
    ERROR = 6  # the engine could not run the request


class _Wire(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    pass


class SamplingParams(_Wire, frozen=True):
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # 1 means off
    top_k: int = 0  # 0 means off
    seed: int = 0  # per-request seed; randomness is keyed by (seed, position)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class NewRequest(_Wire, frozen=True):
    req_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: list[int] = []  # tokens that end the request (EOS); checked by the engine


class ScheduledRequest(_Wire, frozen=True):
    req_id: str
    num_prompt_tokens: int = 0  # prompt tokens to prefill this step; 0 for a decode step
    num_draft_tokens: int = 0  # k: tokens the drafter may propose this decode step; 0 is plain decoding
    drafter: str = ""  # which of the engine's drafters proposes them; "" is its first
    # Whether the control plane plans the request's next step from the drafters' offers (AUTO):
    # when not, drafters that run a model to know their offer skip it.
    wants_offers: bool = True


def max_draft_len(
    max_draft_tokens: int, num_new_tokens_left: int, *, num_offered: int | None = None, step_budget: int | None = None
) -> int:
    """The most draft tokens a decoding request may have verified in one step, never below 0:
    at most max_draft_tokens; at most num_new_tokens_left - 1, so that a fully accepted draft plus
    its bonus token never passes max_new_tokens; at most what the drafter offers, when known; at
    most what is left of the step's token budget, when given. Both sides apply it: the control
    plane to plan k, the engine to what a plan asks of it."""
    bound = min(max_draft_tokens, num_new_tokens_left - 1)
    if num_offered is not None:
        bound = min(bound, num_offered)
    if step_budget is not None:
        bound = min(bound, step_budget)
    return max(bound, 0)


class StepPlan(_Wire, frozen=True, tag=1):
    step_id: int
    new_requests: list[NewRequest] = []  # each request's full data, sent once
    scheduled: list[ScheduledRequest] = []  # the requests that run this step
    finished_req_ids: list[str] = []  # finished or aborted by the control plane: free their state
    # Per drafter whose offers cost nothing: the match length from which its offer is as good as
    # sure. A request it offers that to is not offered to by drafters whose offers run a model
    # (Drafter.offers_run_model): the speculator's head 0 need not run where n-gram lookup copies.
    sure_match_lens: dict[str, int] = {}


class Shutdown(_Wire, frozen=True, tag=2):
    pass


class ProfileShape(_Wire, frozen=True):
    num_seqs: int  # sequences with num_query_tokens each (all of the batch unless num_plain_seqs)
    num_query_tokens: int  # tokens per sequence this step: 1 + k to verify, more for a prefill chunk
    num_context_tokens: int  # tokens already in each sequence's KV cache
    num_plain_seqs: int = 0  # more sequences alongside, decoding one token each (a mixed batch)


class ProfileRequest(_Wire, frozen=True, tag=6):
    """Time synthetic steps of these shapes, to warm the control plane's step-cost model: of the
    target's forward, or with drafter named, of that drafter's model's forward."""

    shapes: list[ProfileShape]
    repeats: int = 2
    drafter: str = ""


class Offer(_Wire, frozen=True):
    """What a drafter could propose for a request's next step, for the control plane's planning."""

    num_tokens: int = 0  # tokens in the proposal (at most the largest k the request may use)
    # How sure the drafter is, as a bucket the policy learns a first-token pass rate for: how
    # many tokens of the sequence's end the proposal's source matched (n-gram lookup: a longer
    # match is more often right), or the MLP speculator's confidence bucket. 0: no notion.
    match_len: int = 0
    # Tokens of the request a draft model has yet to read before it can propose (those of the
    # steps it did not draft in): its next forward feeds them, and the policy prices that.
    num_unseen: int = 0
    # The most KV tokens one of its draft forwards attends to for the request (self-speculation's
    # window); 0: no limit, the request's whole context.
    max_kv_tokens: int = 0


class OfferOutcome(_Wire, frozen=True):
    """How a drafter's offer for a step would have fared had the request drafted with it: its
    first num_tested tokens set against the tokens the target emitted, the first num_passed of
    them equal. For a drafter whose proposal is one token per position (n-gram lookup; the MLP
    speculator's greedy pick), that is what verification would have accepted: exactly when
    decoding greedily, as often in expectation when sampling. So a drafter that AUTO does not use
    is measured all the same, with no draft verified."""

    drafter: str
    num_tested: int
    num_passed: int


class RequestOutput(_Wire, frozen=True):
    req_id: str
    new_token_ids: list[int] = []  # accepted draft tokens plus the recovered or bonus token
    num_drafted: int = 0  # tokens actually drafted (the drafter may find fewer than k)
    num_accepted: int = 0  # drafted tokens the target accepted
    finish_reason: FinishReason = FinishReason.NONE
    error: str = ""
    # For the next step, one per engine drafter in EngineReady.drafters' order; empty once the
    # request has finished.
    offers: list[Offer] = []
    # For this step: how the other drafters' offers would have fared (those that can tell without
    # running a model)
    offer_outcomes: list[OfferOutcome] = []


# The step-cost model prices query-key pairs of sequences of up to this many query tokens
# (decoding, verifying: a key's cost is its read, shared by a few queries) apart from longer ones'
# (prefill chunks: bound by the arithmetic per pair, and attended by another path where the CPU
# kernel is not built).
MAX_SHORT_QUERY_TOKENS = 16
# ... and, of those, the pairs of each sequence's queries past its first SHARED_READ_QUERIES apart:
# the first queries' arithmetic hides under the keys' read, the later ones' does not (on an Intel
# Xeon at 7,680 tokens of context and batch 8, in bfloat16, a sequence's second query cost 0.17 ms
# per thousand keys, its third and fourth 0.35, and the next five 0.43).
SHARED_READ_QUERIES = 2


class BatchShape(_Wire, frozen=True):
    """What a forward pass's time depends on; the control plane fits its step-cost model on it."""

    num_tokens: int = 0  # query tokens over all sequences
    num_seqs: int = 0
    num_context_tokens: int = 0  # KV tokens attended to, summed over sequences, the step's own included
    num_multi_token_seqs: int = 0  # sequences with more than one query token (verifying or prefilling)
    # query-key pairs scored (query tokens x KV tokens) by sequences of up to MAX_SHORT_QUERY_TOKENS ...
    num_attention_pairs: int = 0
    num_long_query_pairs: int = 0  # ... and by longer ones
    num_deep_query_pairs: int = 0  # of num_attention_pairs, those of queries past a sequence's SHARED_READ_QUERIES

    @classmethod
    def of(cls, seqs: list[tuple[int, int]]) -> BatchShape:
        """From each sequence's (query tokens, KV tokens attended, its query included)."""
        return cls(
            num_tokens=sum(n for n, _ in seqs),
            num_seqs=len(seqs),
            num_context_tokens=sum(kv for _, kv in seqs),
            num_multi_token_seqs=sum(n > 1 for n, _ in seqs),
            num_attention_pairs=sum(n * kv for n, kv in seqs if n <= MAX_SHORT_QUERY_TOKENS),
            num_long_query_pairs=sum(n * kv for n, kv in seqs if n > MAX_SHORT_QUERY_TOKENS),
            num_deep_query_pairs=sum(
                (n - SHARED_READ_QUERIES) * kv for n, kv in seqs if SHARED_READ_QUERIES < n <= MAX_SHORT_QUERY_TOKENS
            ),
        )


class DraftRun(_Wire, frozen=True):
    """One drafter's work in a step, for the control plane's drafting-cost model."""

    drafter: str
    seconds: float  # its call (a draft model also prefills then)
    num_requests: int = 0  # requests it drafted for
    forwards: list[BatchShape] = []  # a draft model's forward passes, in order; none for a model-free drafter


class StepTimings(_Wire, frozen=True):
    draft_s: float = 0.0  # the drafters' share of the step (a draft model also prefills then); 0 if none ran
    forward_s: float = 0.0  # the batched target forward
    sample_s: float = 0.0  # sampling and verification
    step_s: float = 0.0  # the whole step, from plan received to result built
    idle_s: float = 0.0  # how long the engine waited for this plan after sending its last result


class StepResult(_Wire, frozen=True, tag=3):
    step_id: int
    outputs: list[RequestOutput] = []
    timings: StepTimings = StepTimings()
    shape: BatchShape = BatchShape()  # of the forward pass
    draft_runs: list[DraftRun] = []  # the drafters that ran
    finished_at_s: float = 0.0  # time.monotonic() in the engine when the result was built


class EngineReady(_Wire, frozen=True, tag=4):
    model_name: str
    model_type: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    kv_capacity_tokens: int
    max_draft_tokens: int
    drafters: list[str]  # in the order of RequestOutput.offers; the first serves plans that name none
    model_drafters: list[str]  # those that run a model: the control plane profiles and prices their forwards
    prefill_drafters: list[str]  # of those, the ones that prefill with the target (a draft model's own cache)
    prior_acceptance: dict[str, float]  # per drafter: the pass rate to plan with before its first draft
    device: str
    dtype: str
    model_path: str  # where the tokenizer and chat template can be read
    load_s: float = 0.0
    kernel_row_limit: int = 0  # the target's products of up to this many rows run in our kernel
    offer_model_drafters: list[str] = []  # drafters that run a model to work out their offers (the speculator)


class EngineError(_Wire, frozen=True, tag=5):
    message: str
    traceback: str = ""


class StepSample(_Wire, frozen=True):
    shape: BatchShape
    step_s: float


class ProfileResult(_Wire, frozen=True, tag=7):
    samples: list[StepSample]


EngineInput = StepPlan | Shutdown | ProfileRequest
EngineOutput = StepResult | EngineReady | EngineError | ProfileResult
