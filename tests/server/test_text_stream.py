from __future__ import annotations

import pytest

from server.text_stream import REPLACEMENT_CHAR, TextStream
from server.tokenizer import TextTokenizer

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str) -> TextTokenizer:
    return TextTokenizer(smollm2_path)


def stream_all(tokenizer: TextTokenizer, ids: list[int], stop: tuple[str, ...] = (), step: int = 1) -> list[str]:
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return [*deltas, stream.finish()]


@pytest.mark.parametrize("step", [1, 2, 3])
def test_multibyte_characters_are_never_split(tokenizer: TextTokenizer, step: int) -> None:
    text = "naïve café, 你好世界 🙂🚀 — done"
    ids = tokenizer.encode(text)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids), "some character must span tokens"
    deltas = stream_all(tokenizer, ids, step=step)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_stop_sequence_is_cut_and_never_sent(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("def f():\n    return 1\n\nprint(f())")
    deltas = stream_all(tokenizer, ids, stop=("\n\n",))
    assert "".join(deltas) == "def f():\n    return 1"


def test_special_tokens_are_not_shown(tokenizer: TextTokenizer) -> None:
    ids = [*tokenizer.encode("Hello"), 2]  # 2 is <|im_end|>, SmolLM2's EOS
    assert "".join(stream_all(tokenizer, ids)) == "Hello"
