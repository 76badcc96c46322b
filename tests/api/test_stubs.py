"""The committed stubs in api/pb/ are what `make proto` makes from the proto today."""

from __future__ import annotations

from pathlib import Path

from api.pb.generate import OUT, STUBS, generate


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in STUBS:
        assert (tmp_path / name).read_text() == (OUT / name).read_text(), f"api/pb/{name} is stale: make proto"
