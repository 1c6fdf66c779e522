"""load_model: plain dirs unchanged, compressed dirs with quantized layers swapped in, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from runtime_helpers import compressed_dir, dequantized_reference, source_dir

from fastserve_ray.errors import ModelDirError
from fastserve_ray.models import load_model_dir
from fastserve_ray.models.model_dir import MANIFEST_FILE
from fastserve_ray.quantized.artifact import COMPRESSED_FILE
from fastserve_ray.quantized.linear import QuantizedLinear
from fastserve_ray.quantized.loader import load_model, resolve_kernels
from fastserve_ray.quantized.rnn import QuantizedRNN


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("loader")
    src = source_dir(root / "src", tiny_tokenizer)
    out, tensors = compressed_dir(root / "int", src)
    return src, out, tensors


def test_plain_directory_loads_as_before(dirs):
    src, _, _ = dirs
    ours, plain = load_model(src), load_model_dir(src)
    tokens = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        assert torch.equal(ours.model(tokens), plain.model(tokens))
    assert not any(isinstance(m, QuantizedLinear) for m in ours.model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_directory_runs_quantized_layers(dirs, dtype):
    src, out, tensors = dirs
    loaded = load_model(out, dtype=dtype)
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per decoder layer
    assert {m.storage for m in layers} == {"int4pack", "int8"}
    assert loaded.manifest["compression"]["recipe"]
    ref = dequantized_reference(src, tensors, dtype)
    tokens = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        y, y_ref = loaded.model(tokens), ref(tokens)
    assert y.dtype == dtype
    # bf16 activations inside the int kernels: bf16-level agreement on the logits.
    assert ((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item() < 0.03


def test_forced_dequant_kernel_matches_reference_exactly_in_fp32(dirs):
    src, out, tensors = dirs
    loaded = load_model(out, kernels="dequant")
    tokens = torch.randint(0, 400, (1, 10))
    with torch.no_grad():
        assert (loaded.model(tokens) - dequantized_reference(src, tensors)(tokens)).abs().max() < 1e-4


@pytest.mark.parametrize("preset", ["lstm-tiny", "gru-tiny"])
def test_recurrent_weights_run_quantized(tmp_path, tiny_tokenizer, preset):
    src = source_dir(tmp_path / "src", tiny_tokenizer, preset)
    out, tensors = compressed_dir(tmp_path / "int8", src, scheme="int8")
    loaded = load_model(out, kernels="dequant")
    assert isinstance(loaded.model.rnn, QuantizedRNN)
    tokens = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        diff = (loaded.model(tokens) - dequantized_reference(src, tensors)(tokens)).abs().max()
    assert diff < 1e-4


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel"):
        resolve_kernels(["int2magic"])


def _copy(out, tmp_path):
    import shutil

    return shutil.copytree(out, tmp_path / "copy")


def test_truncated_compressed_file_names_the_file(dirs, tmp_path):
    d = _copy(dirs[1], tmp_path)
    data = (d / COMPRESSED_FILE).read_bytes()
    (d / COMPRESSED_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelDirError, match=COMPRESSED_FILE):
        load_model(d)


def test_bit_flip_names_the_file(dirs, tmp_path):
    d = _copy(dirs[1], tmp_path)
    data = bytearray((d / COMPRESSED_FILE).read_bytes())
    data[-7] ^= 0x10
    (d / COMPRESSED_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=f"{COMPRESSED_FILE}.*sha256"):
        load_model(d)


def test_inconsistent_manifest_is_a_clear_error(dirs, tmp_path):
    d = _copy(dirs[1], tmp_path)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    meta = manifest["compression"]["tensors"]["layers.0.mlp.up_proj.weight"]
    meta["shape"] = [meta["shape"][0], meta["shape"][1] * 2]  # checksums intact, contents inconsistent
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match=r"up_proj"):
        load_model(d)


def test_perplexity_of_the_compressed_model_matches_the_dequantized_reference(dirs):
    from fastserve_ray.models.evaluate import evaluate_rows

    src, out, tensors = dirs
    rows = np.random.default_rng(0).integers(3, 400, (4, 33))
    ours = evaluate_rows(load_model(out).model, rows)["perplexity"]
    ref = evaluate_rows(dequantized_reference(src, tensors), rows)["perplexity"]
    assert abs(ours / ref - 1) < 0.01
