"""Prometheus metrics, in a registry of their own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from server.policy.snapshot import PolicySnapshot

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("goodspeed_requests", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter("goodspeed_rejected_requests", "Requests refused at admission", ["code"], registry=r)
        self.running = Gauge("goodspeed_requests_running", "Requests in the batch", registry=r)
        self.waiting = Gauge("goodspeed_requests_waiting", "Requests waiting for admission", registry=r)
        self.prompt_tokens = Counter("goodspeed_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("goodspeed_generated_tokens", "Generated tokens", registry=r)
        self.steps = Counter("goodspeed_engine_steps", "Engine steps", registry=r)
        self.step_seconds = Histogram("goodspeed_step_seconds", "Engine step time", buckets=STEP_BUCKETS, registry=r)
        self.draft_seconds = Histogram(
            "goodspeed_spec_draft_seconds",
            "Drafter time per engine step in which it ran (a draft model also prefills then)",
            ["drafter"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Gauge("goodspeed_batch_size", "Requests in the last step", registry=r)
        self.draft_tokens = Counter("goodspeed_spec_draft_tokens", "Drafted tokens", ["drafter"], registry=r)
        self.accepted_tokens = Counter(
            "goodspeed_spec_accepted_tokens", "Accepted draft tokens", ["drafter"], registry=r
        )
        self.accepted_per_position = Counter(
            "goodspeed_spec_accepted_tokens_per_position",
            "Accepted draft tokens by position",
            ["position"],
            registry=r,
        )
        self.draft_length = Histogram(
            "goodspeed_spec_draft_length",
            "k chosen per decoding request and step",
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "goodspeed_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "goodspeed_request_seconds",
            "Request latency, arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_tokens_used = Gauge("goodspeed_kv_tokens_used", "KV tokens reserved by running requests", registry=r)
        self.kv_tokens_capacity = Gauge("goodspeed_kv_tokens_capacity", "KV cache size in tokens", registry=r)
        self.engine_restarts = Counter("goodspeed_engine_restarts", "Engine process restarts", registry=r)
        self.goodput = Gauge(
            "goodspeed_policy_goodput_tokens_per_second",
            "Predicted goodput of the last AUTO step",
            ["plan"],
            registry=r,
        )
        self.acceptance_rate = Gauge(
            "goodspeed_policy_acceptance_rate",
            "Server-wide acceptance estimate of a drafter's first draft token, and of each further one given the "
            "last passed",
            ["drafter", "draft_token"],
            registry=r,
        )
        self.first_token_rate = Gauge(
            "goodspeed_policy_first_token_rate",
            "Server-wide acceptance estimate of a drafter's first draft token, by the match length of its proposal "
            "(n-gram lookup; 0 for a draft model)",
            ["drafter", "match_len"],
            registry=r,
        )
        self.cost_model_error = Gauge(
            "goodspeed_policy_cost_model_error", "Recent mean relative error of predicted step time", registry=r
        )
        self.draft_cost_model_error = Gauge(
            "goodspeed_policy_draft_cost_model_error",
            "Recent mean relative error of a draft model's predicted drafting time",
            ["drafter"],
            registry=r,
        )
        self.cost_coefficient = Gauge(
            "goodspeed_policy_cost_coefficient_seconds", "Step-cost model coefficients", ["feature"], registry=r
        )
        self.probes = Counter("goodspeed_policy_probes", "k = 1 probes of requests kept at k = 0", registry=r)

    def show_policy(self, snapshot: PolicySnapshot, previous: PolicySnapshot | None = None) -> None:
        """Sets the policy gauges from the snapshot the control loop publishes after each step."""
        self.goodput.labels(plan="chosen").set(snapshot.goodput)
        self.goodput.labels(plan="plain").set(snapshot.plain_goodput)
        for drafter, figures in snapshot.drafters.items():
            self.acceptance_rate.labels(drafter=drafter, draft_token="first").set(figures.first_rate)
            self.acceptance_rate.labels(drafter=drafter, draft_token="rest").set(figures.continuation_rate)
            if figures.cost_coefficients:  # a drafter that runs a model
                self.draft_cost_model_error.labels(drafter=drafter).set(figures.cost_model_error)
            for match_len, rate in figures.first_token_rates.items():
                self.first_token_rate.labels(drafter=drafter, match_len=str(match_len)).set(rate)
        self.cost_model_error.set(snapshot.cost_model_error)
        self.probes.inc(snapshot.num_probes - (previous.num_probes if previous else 0))
        if previous is None or snapshot.cost_coefficients is not previous.cost_coefficients:  # refitted
            for feature, value in snapshot.cost_coefficients.items():
                self.cost_coefficient.labels(feature=feature).set(value)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serves /metrics from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)
