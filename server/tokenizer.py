"""Tokenizer and chat template of a model directory, without transformers (and so without torch).

The control plane tokenizes prompts, renders chat messages and detokenizes output. It reads the
files transformers saved: tokenizer.json (run by the `tokenizers` library), tokenizer_config.json
and the chat template, which is rendered with jinja2 the way transformers renders it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The chat template refused the messages."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _special_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.bos_token = _special_token(config, "bos_token")
        self.eos_token = _special_token(config, "eos_token")
        template_file = path / "chat_template.jinja"
        template_source = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        self.chat_template = None
        if isinstance(template_source, str):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self.chat_template = env.from_string(template_source)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_token_ids = frozenset(
            token_id for token_id, added in self.tokenizer.get_added_tokens_decoder().items() if added.special
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template; send a raw prompt instead of messages")
        return str(
            self.chat_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The rendered template already holds the special tokens, as in transformers.
        return list(self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids)
