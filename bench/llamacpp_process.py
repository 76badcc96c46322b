"""llama.cpp (through llama-cpp-python) as a reference system, in a process of its own.

Optional: `pip install -e '.[llamacpp]'` builds it from source (a few minutes on 2 cores). The
catalog's models come from a GGUF file, so llama.cpp runs the very file goodspeed converted
(`q4_1` for the default model: 4-bit weights; goodspeed's float32 weights are those dequantised).
Its float32 and bfloat16 forms are that file with the matrices dequantised (gguf's own
functions): goodspeed's weights in goodspeed's dtype. Files are kept under the cache's `gguf/`
folder.
"""

from __future__ import annotations

import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, LlamaFileType
from tqdm import tqdm

from bench.machine import cpu_flags
from bench.reference_process import ReferenceProcess
from engine.catalog import find_model
from engine.fetch import cache_root, fetch_gguf

# goodspeed's dtype name -> GGUF's type of the matrices, and the file type that says so
DEQUANTIZED_TYPES = {
    "float32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "bfloat16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
}


class LlamaCppReference:
    """Greedy decoding with llama-cpp-python, all cores, a fresh KV cache per prompt."""

    def __init__(self, gguf_path: str, eos_ids: list[int], context_tokens: int) -> None:
        from llama_cpp import Llama

        if "amx_int8" in cpu_flags():
            without_extra_buffer_types()
        num_threads = os.cpu_count() or 1
        self.llm: Any = Llama(
            model_path=gguf_path,
            n_ctx=context_tokens,
            n_threads=num_threads,
            n_threads_batch=num_threads,
            verbose=False,
        )
        self.eos_ids = set(eos_ids)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        started = time.perf_counter()
        self.llm.reset()  # no reuse of an earlier prompt's prefix: every prompt is prefilled in full
        output: list[int] = []
        for token_id in self.llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            output.append(token_id)
            if token_id in self.eos_ids or len(output) >= max_new_tokens:
                break
        return output, time.perf_counter() - started


def without_extra_buffer_types() -> None:
    """Load models without llama.cpp's extra buffer types (its weight repacking), as its CLI's
    --no-repack does. With AMX, llama-cpp-python 0.3.36 repacks the 4-bit file's matrices for
    AMX and then crashes (a segmentation fault in the first forward, on an Intel Xeon with
    amx_int8); the bfloat16 and float32 files never take that path. Llama() builds its model
    parameters from llama_model_default_params() and takes no argument for this one, so this
    process's defaults are replaced."""
    import llama_cpp.llama_cpp as library

    defaults = library.llama_model_default_params

    def no_extra_buffer_types() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    library.llama_model_default_params = no_extra_buffer_types


class LlamaCppProcess(ReferenceProcess):
    def __init__(self, gguf_path: Path, eos_ids: list[int], context_tokens: int = 4096) -> None:
        super().__init__("llama.cpp", LlamaCppReference, str(gguf_path), eos_ids, context_tokens)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        output, seconds = self.call("generate", prompt_ids, max_new_tokens)
        return list(output), float(seconds)


def is_available() -> bool:
    try:
        metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return False
    return True


def gguf_for(model: str, weight_type: str) -> Path:
    """The GGUF of model in weight_type: "native" (the catalog's own file) or a dtype name (that
    file with its matrices dequantised, written once). A dtype's file already in the cache's gguf/
    folder is used as it is, without fetching the catalog's: where that cannot be fetched,
    llama.cpp's own converter can write it from the cached model (`convert_hf_to_gguf.py
    <cache>/models/NAME --outtype bf16 --outfile <cache>/gguf/NAME-bfloat16.gguf`: the same
    weights, rounded as goodspeed rounds them)."""
    folder = cache_root() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    entry = find_model(model)
    if entry is None:
        raise ValueError(f"llama.cpp runs catalog models only (goodspeed models list), not {model!r}")
    path = folder / f"{entry.name}-{weight_type}.gguf"
    if path.exists():
        return path
    native = folder / f"{entry.name}-native.gguf"
    if not native.exists():
        fetch_gguf(entry, native)
    if weight_type != "native":
        write_dequantized(native, path, weight_type)
    return path


def write_dequantized(source: Path, out: Path, weight_type: str) -> None:
    """source's GGUF with every quantised tensor dequantised to weight_type ("float32" or
    "bfloat16"), metadata and tokenizer unchanged: the same weights as goodspeed's (dequantised
    from that file) in the same dtype. Vectors (the norms) stay float32, as llama.cpp wants them."""
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    matrix_type, file_type = DEQUANTIZED_TYPES[weight_type]
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, architecture)
    for field in reader.fields.values():
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) or field.name.startswith(
            "GGUF."
        ):
            continue  # written by GGUFWriter, or replaced below
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(file_type)
    for tensor in tqdm(reader.tensors, desc=f"dequantising to {weight_type}", unit="tensor"):
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        qtype = matrix_type if values.ndim > 1 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(tensor.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
