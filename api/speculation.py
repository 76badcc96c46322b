"""The speculation mode: the proto's enum as a Python enum, and its one text spelling.

Every text layer (the serve and generate flags, the Python client, the benchmarks) spells a
mode as its lower-case name, `auto`, `off` or `fixed`, and parses it here.
"""

from __future__ import annotations

import enum


class SpeculationMode(enum.IntEnum):
    """The proto's SpeculationMode, value for value (a test checks); kept free of protobuf so the
    command line can parse a mode without loading the stubs."""

    DEFAULT = 0  # a request that does not choose: the server-wide mode
    AUTO = 1  # the goodput policy chooses k every step
    OFF = 2  # plain decoding
    FIXED = 3  # num_draft_tokens every step

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> SpeculationMode:
        """'auto', 'off' or 'fixed' -> the mode; ValueError naming the choices otherwise."""
        for mode in (cls.AUTO, cls.OFF, cls.FIXED):
            if mode.label == text:
                return mode
        raise ValueError(f"unknown speculation mode {text!r}; use {', '.join(LABELS)}")


LABELS = tuple(mode.label for mode in (SpeculationMode.AUTO, SpeculationMode.OFF, SpeculationMode.FIXED))
