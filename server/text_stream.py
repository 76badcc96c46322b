"""A request's output text, produced incrementally from its token ids.

Decoding a few tokens at a time can cut a multi-byte character in half: byte-level tokenizers
spread one emoji or CJK character over several tokens. Like TGI and vLLM, each step decodes a
small window twice (with and without the new tokens) and only emits text once it no longer ends
in the replacement character. Text that could be the start of a stop sequence is held back until
it is known not to be one, so a stop sequence never reaches the client.
"""

from __future__ import annotations

from server.tokenizer import TextTokenizer

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # the decode window starts here: context for the tokenizer
        self.read_offset = 0  # tokens before this are already in self.text
        self.text = ""  # decoded, complete characters (cut at a matched stop sequence)
        self.num_emitted = 0  # characters of self.text already returned
        self.is_stopped = False  # a stop sequence matched

    def push(self, new_ids: list[int]) -> str:
        """Adds a step's tokens; returns the text that can be sent now."""
        if self.is_stopped:
            return ""
        self.token_ids.extend(new_ids)
        self._append(self._decode_window(is_final=False))
        return self._take(hold_back=True)

    def finish(self) -> str:
        """Returns whatever is left, incomplete characters and held-back text included."""
        if not self.is_stopped:
            self._append(self._decode_window(is_final=True))
        return self._take(hold_back=False)

    def _decode_window(self, is_final: bool) -> str:
        window = self.token_ids[self.prefix_offset :]
        prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(window)
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not is_final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def _append(self, new_text: str) -> None:
        if not new_text:
            return
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += new_text
        if not self.stop:
            return
        matches = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if matches:
            self.text = self.text[: min(matches)]
            self.is_stopped = True

    def _take(self, hold_back: bool) -> str:
        end = len(self.text)
        if hold_back and not self.is_stopped:
            end -= self._stop_prefix_len()
        delta = self.text[self.num_emitted : end]
        self.num_emitted = max(self.num_emitted, end)
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the text that some stop sequence starts with."""
        for n in range(min(self.max_stop_len - 1, len(self.text) - self.num_emitted), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
