"""Configuration of the engine process."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
DRAFTERS = ("ngram", "model", "none")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = "smollm2-135m"  # a catalog name, a local HF directory, or a hub id
    device: str = "cpu"
    dtype: str = "float32"
    kv_cache_tokens: int = 32768  # KV budget, shared by all running requests
    max_draft_tokens: int = 8  # the largest k a plan may ask for
    drafter: str = "ngram"
    draft_model: str = ""  # for drafter "model": a catalog name, a local HF directory or a hub id
    ngram_min: int = 2
    ngram_max: int = 8  # a full 8-token match is right 97% of the time on HumanEval
    num_threads: int = 0  # torch intra-op threads; 0 means all cores
    nice: int = 10  # the engine process's niceness, relative to the server's (0 keeps it equal)
    verify_model: bool = False  # check a cached model's sha256s before loading, not only its sizes

    def __post_init__(self) -> None:
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")
        if (self.drafter == "model") != bool(self.draft_model):
            raise ValueError(
                "the model drafter needs a draft model, and a draft model needs the model drafter: "
                f"got drafter {self.drafter!r} and draft model {self.draft_model!r}"
            )
        if self.kv_cache_tokens < 16:
            raise ValueError(f"kv_cache_tokens must be at least 16, got {self.kv_cache_tokens}")
        if not 0 <= self.max_draft_tokens <= 32:
            raise ValueError(f"max_draft_tokens must be in [0, 32], got {self.max_draft_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"n-gram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}"
            )
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in [0, 19], got {self.nice}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
