"""Configuration of the engine process."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
DRAFTERS = ("ngram", "model", "self", "mlp")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = "smollm2-135m"  # a catalog name, a local HF directory, or a hub id
    device: str = "cpu"
    dtype: str = "float32"
    # KV budget, shared by all running requests: 8 requests of 8K tokens. The default model's KV
    # is 46 KB a token in float32 (3 GB when full; half that in bfloat16, kv_cache.kv_dtype); pages
    # become resident as rows are first used.
    kv_cache_tokens: int = 65536
    max_draft_tokens: int = 8  # the largest k a plan may ask for
    # Every drafter the engine holds; the policy picks one per request and step. () means none.
    drafters: tuple[str, ...] = ("ngram", "self")
    draft_model: str = ""  # for drafter "model": a catalog name, a local HF directory or a hub id
    ngram_min: int = 2
    ngram_max: int = 8  # a full 8-token match is right 97% of the time on HumanEval
    # drafter "self": the target drafts over its first sink tokens and its last window tokens
    # (MagicDec's StreamingLLM budget of 512, its 16 sinks)
    self_spec_sink_tokens: int = 16
    self_spec_window_tokens: int = 496
    num_threads: int = 0  # torch intra-op threads; 0 means all cores
    nice: int = 10  # the engine process's niceness, relative to the server's (0 keeps it equal)
    verify_model: bool = False  # check a cached model's sha256s before loading, not only its sizes
    # Products of up to this many rows run in the engine's own kernel; None: as an earlier start on
    # this CPU timed it, else timed at load (engine/model/row_limit.py, seconds). The server passes
    # the first start's limit to restarts.
    kernel_row_limit: int | None = None

    def __post_init__(self) -> None:
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in self.drafters:
            if name not in DRAFTERS:
                raise ValueError(f"drafters must be among {', '.join(DRAFTERS)}, got {name!r}")
        if len(set(self.drafters)) != len(self.drafters):
            raise ValueError(f"drafters must not repeat, got {','.join(self.drafters)}")
        if ("model" in self.drafters) != bool(self.draft_model):
            raise ValueError(
                "the model drafter needs a draft model, and a draft model needs the model drafter: "
                f"got drafters {','.join(self.drafters) or 'none'} and draft model {self.draft_model!r}"
            )
        if self.kv_cache_tokens < 16:
            raise ValueError(f"kv_cache_tokens must be at least 16, got {self.kv_cache_tokens}")
        if not 0 <= self.max_draft_tokens <= 32:
            raise ValueError(f"max_draft_tokens must be in [0, 32], got {self.max_draft_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(
                f"n-gram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}"
            )
        if self.self_spec_sink_tokens < 0 or self.self_spec_window_tokens < 1:
            raise ValueError(
                "self-speculation needs self_spec_sink_tokens >= 0 and self_spec_window_tokens >= 1, got "
                f"{self.self_spec_sink_tokens} and {self.self_spec_window_tokens}"
            )
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in [0, 19], got {self.nice}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        if self.kernel_row_limit is not None and self.kernel_row_limit < 0:
            raise ValueError(f"kernel_row_limit must be >= 0, got {self.kernel_row_limit}")


def parse_drafters(text: str | None, has_draft_model: bool, has_speculator: bool = False) -> tuple[str, ...]:
    """`--drafters`: a comma-separated list, or "none". By default the n-gram drafter,
    self-speculation (which offers drafts only once a request outgrows its window), the draft
    model when one is given and the MLP speculator when one is trained for the model: the policy
    decides per request which one pays."""
    if text is None:
        return ("ngram",) + (("model",) if has_draft_model else ()) + ("self",) + (("mlp",) if has_speculator else ())
    if text.strip() == "none":
        return ()
    return tuple(name.strip() for name in text.split(",") if name.strip())
