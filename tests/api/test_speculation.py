"""The speculation mode's one text spelling, and its values against the proto's."""

from __future__ import annotations

import pytest

from api.pb import generation_pb2 as pb
from api.speculation import LABELS, SpeculationMode


def test_the_modes_are_the_protos_value_for_value() -> None:
    assert {mode.name: int(mode) for mode in SpeculationMode if mode != SpeculationMode.DEFAULT} == {
        name: pb.SpeculationMode.Value(name) for name in ("AUTO", "OFF", "FIXED")
    }
    assert SpeculationMode.DEFAULT == pb.SPECULATION_MODE_UNSPECIFIED


def test_each_mode_parses_from_its_label_and_nothing_else_does() -> None:
    assert LABELS == ("auto", "off", "fixed")
    assert [SpeculationMode.parse(label) for label in LABELS] == [
        SpeculationMode.AUTO,
        SpeculationMode.OFF,
        SpeculationMode.FIXED,
    ]
    for bad in ("AUTO", "default", "goodput", "fixed4", ""):
        with pytest.raises(ValueError, match="use auto, off, fixed"):
            SpeculationMode.parse(bad)
