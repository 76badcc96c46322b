"""The load benchmark's bookkeeping: repeats pooled into one point, k shares, AUTO's summary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.load import (
    LoadShape,
    PointRun,
    RequestRecord,
    k_text,
    point_run,
    speculation_args,
    summarize,
    summarize_point,
)


def record(arrival: float, latency: float, num_tokens: int = 11, error: str = "") -> RequestRecord:
    return RequestRecord(
        arrival_s=arrival,
        first_token_s=arrival + 0.1,
        end_s=arrival + latency,
        num_tokens=num_tokens,
        num_steps=5,
        num_step_tokens=float(num_tokens - 1),
        error=error,
    )


def test_repeats_are_pooled_and_each_keeps_its_mean() -> None:
    first = PointRun(
        [record(0.0, 1.0), record(1.0, 3.0)],
        wall_s=4.0,
        window_s=4.0,
        window_tokens=22,
        drafts_per_length=[2, 0, 8],
        num_steps=10,
        cost_model_error=0.2,
        draft_cost_model_error={"model": 0.3},
    )
    second = PointRun(
        [record(0.0, 2.0), record(0.5, 2.0, error="UNAVAILABLE: x")],
        wall_s=2.0,
        window_s=2.0,
        window_tokens=11,
        drafts_per_length=[0, 5, 5],
        num_steps=10,
        cost_model_error=0.1,
        draft_cost_model_error={"model": 0.15},
    )
    point = summarize_point("auto", 1.0, [first, second])
    assert point.num_requests == 4 and point.num_errors == 1
    assert point.mean_latency_s == pytest.approx(2.0)  # (1 + 3 + 2) / 3, the failed request left out
    assert point.repeat_mean_latencies_s == [2.0, 2.0]
    assert point.repeat_tokens_per_s == [5.5, 5.5]
    assert point.tokens_per_s == pytest.approx(33 / 6)
    assert point.mean_accepted_length == pytest.approx(30 / 15)
    assert point.drafts_per_length == [2, 5, 13] and point.num_steps == 20
    assert point.cost_model_error == 0.1 and point.draft_cost_model_error == {"model": 0.15}  # the latest


def test_k_text_lists_the_k_values_used() -> None:
    assert k_text([1, 0, 0, 0, 3]) == "0:25% 4:75%"
    assert k_text([0, 0]) == "-"


def test_summary_compares_auto_with_the_best_other_policy() -> None:
    # Two repeats per policy: the latency of its one request in each.
    runs = {"off": (4.0, 4.0), "fixed4": (1.0, 3.0), "auto": (1.2, 3.0)}
    points = [
        summarize_point(p, 0.5, [PointRun([record(0.0, t)], t, t, 11, [1], 1, 0.0, {}) for t in times])
        for p, times in runs.items()
    ]
    summary = summarize(points)["0.5"]
    assert summary["best_other"] == "fixed4"
    assert summary["auto_over_best"] == pytest.approx(1.05)
    assert summary["auto_over_best_by_repeat"] == pytest.approx([1.2, 1.0])
    assert summary["off_over_auto"] == pytest.approx(4.0 / 2.1, abs=1e-3)


def test_closed_loop_throughput_counts_only_while_the_batch_is_full() -> None:
    records = [record(0.0, 2.0), record(0.0, 3.0), record(2.0, 2.0)]  # 2 clients: the third follows the first
    for r, times in zip(records, ([0.5, 1.5], [1.0, 2.5], [2.5, 3.5]), strict=True):
        r.token_times = [(t, 5) for t in times]
    model = SimpleNamespace(cost_model_error=0.25, cost_model_ms={"const": 1.0})
    stats = SimpleNamespace(
        drafts_per_length=[0, 0],
        steps=0,
        cost_model_error=0.0,
        drafters={"ngram": SimpleNamespace(cost_model_error=0.0, cost_model_ms={}), "model": model},
    )
    run = point_run(records, records[1].arrival_s, records[-1].arrival_s, stats, stats)
    assert run.draft_cost_model_error == {"model": 0.25}  # only drafters with a cost model
    assert run.window_s == 2.0 and run.window_tokens == 15  # the chunks read at 0.5, 1.0 and 1.5
    assert run.wall_s == 4.0


def test_closed_loop_summary_also_compares_throughput() -> None:
    def point(policy: str, latency: float, tokens: int) -> PointRun:
        return PointRun([record(0.0, latency)], latency, 10.0, tokens, [1], 1, 0.0, {})

    runs = {"off": point("off", 4.0, 500), "fixed1": point("fixed1", 3.0, 700), "auto": point("auto", 3.3, 630)}
    summary = summarize([summarize_point(p, 0.0, [run], concurrency=8) for p, run in runs.items()])["c8"]
    assert summary["best_other"] == "fixed1" and summary["auto_over_best"] == pytest.approx(1.1)
    assert summary["most_tokens_per_s"] == "fixed1" and summary["auto_tokens_per_s_over_most"] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seconds_per_point": 0}, "seconds_per_point"),
        ({"min_requests": 50}, "min_requests"),
        ({"repeats": 0}, "repeats"),
        ({"requests_per_client": 1}, "requests_per_client"),
    ],
)
def test_bad_load_shapes_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LoadShape(**kwargs)


def test_policy_names_parse_to_the_clients_speculation_arguments() -> None:
    assert speculation_args("auto") == {"speculation": "auto", "num_draft_tokens": 0, "drafter": ""}
    assert speculation_args("fixed4") == {"speculation": "fixed", "num_draft_tokens": 4, "drafter": ""}
    assert speculation_args("model2") == {"speculation": "fixed", "num_draft_tokens": 2, "drafter": "model"}
    for bad in ("fixed", "off2", "goodput", "4", "ngram", "medusa3"):
        with pytest.raises(ValueError):
            speculation_args(bad)
