from __future__ import annotations

import pytest

from api.speculation import SpeculationMode
from server.errors import InvalidArgumentError
from server.request import ChatMessage, GenerationRequest, Limits

LIMITS = Limits(max_new_tokens=100, max_draft_tokens=8, max_stop_sequences=2, max_stop_length=5)


def check(**fields: object) -> None:
    fields.setdefault("max_new_tokens", 10)
    GenerationRequest(request_id="r", **fields).validate(LIMITS)  # type: ignore[arg-type]


def test_a_good_request_passes() -> None:
    check(
        prompt="hi",
        max_new_tokens=10,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        stop=("ab",),
        speculation_mode=SpeculationMode.FIXED,
        num_draft_tokens=8,
        drafter="ngram",
    )
    check(messages=(ChatMessage("user", "hi"),), speculation_mode=SpeculationMode.OFF)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "a", "messages": (ChatMessage("user", "b"),)}, "prompt"),
        ({"messages": (ChatMessage("robot", "b"),)}, "messages[0].role"),
        ({"prompt": "a", "max_new_tokens": 101}, "max_new_tokens"),
        ({"prompt": "a", "temperature": float("-inf")}, "temperature"),
        ({"prompt": "a", "top_p": -0.1}, "top_p"),
        ({"prompt": "a", "top_k": -2}, "top_k"),
        ({"prompt": "a", "stop": ("a", "b", "c")}, "stop"),
        ({"prompt": "a", "stop": ("toolong",)}, "stop[0]"),
        ({"prompt": "a", "speculation_mode": 9}, "speculation.mode"),
        (
            {"prompt": "a", "speculation_mode": SpeculationMode.FIXED, "num_draft_tokens": 9},
            "speculation.num_draft_tokens",
        ),
        (
            {"prompt": "a", "speculation_mode": SpeculationMode.AUTO, "num_draft_tokens": 2},
            "speculation.num_draft_tokens",
        ),
        (
            {"prompt": "a", "speculation_mode": SpeculationMode.FIXED, "num_draft_tokens": 2, "drafter": "model"},
            "speculation.drafter",  # this server has only ngram
        ),
        ({"prompt": "a", "speculation_mode": SpeculationMode.AUTO, "drafter": "ngram"}, "speculation.drafter"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as excinfo:
        check(**fields)
    assert excinfo.value.field == field and str(excinfo.value).startswith(f"{field}: ")
