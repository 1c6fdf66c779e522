"""The compressed model directory: exact round trip, checksums, corruption and inconsistency errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastserve_ray.errors import ModelDirError
from fastserve_ray.models.weights import load_tensors
from fastserve_ray.quantized.artifact import (
    COMPRESSED_FILE,
    is_compressed_model_dir,
    read_compressed_tensors,
    write_compressed_model_dir,
)
from fastserve_ray.quantized.qtensor import QuantizedWeight

RECIPE = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": "W4A16"}}}}


def _compressed_tensors(model_dir: Path) -> dict:
    tensors: dict = dict(load_tensors(model_dir))
    for name in list(tensors):
        if name.endswith("q_proj.weight"):
            tensors[name] = QuantizedWeight.from_float(tensors[name], 4, 32)
        elif name.endswith("gate_proj.weight"):
            w = tensors[name].clone()
            w[w.abs() < w.abs().median()] = 0.0
            tensors[name] = w  # pruned, stays float
    return tensors


@pytest.fixture()
def artifact(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, dict]:
    tensors = _compressed_tensors(tiny_model_dir)
    sparse = {n: "unstructured" for n in tensors if n.endswith("gate_proj.weight")}
    out = write_compressed_model_dir(tmp_path / "out", tiny_model_dir, tensors, RECIPE,
                                     {"eval": {"perplexity_after": 1.0}}, sparsity=sparse)
    return out, tensors


def test_round_trip_is_exact(artifact: tuple[Path, dict], tiny_model_dir: Path) -> None:
    out, tensors = artifact
    assert is_compressed_model_dir(out) and not is_compressed_model_dir(tiny_model_dir)
    back, compression = read_compressed_tensors(out)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        if isinstance(value, QuantizedWeight):
            assert isinstance(back[name], QuantizedWeight)
            assert torch.equal(back[name].q, value.q) and torch.equal(back[name].scale, value.scale)
        else:
            assert torch.equal(back[name], value), name
    assert compression["recipe"] == RECIPE and compression["eval"] == {"perplexity_after": 1.0}
    meta = compression["tensors"]["layers.0.self_attn.q_proj.weight"]
    assert meta["format"] == "quantized" and meta["bits"] == 4 and meta["shape"] == [64, 64]
    assert compression["tensors"]["layers.1.mlp.gate_proj.weight"]["format"] == "sparse"
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", COMPRESSED_FILE
    }
    assert len(compression["source"]["manifest_sha256"]) == 64
    # Compressed tensors are not duplicated in the float file.
    assert "layers.0.self_attn.q_proj.weight" not in load_tensors(out)


def test_bit_flip_and_truncation_are_named(artifact: tuple[Path, dict]) -> None:
    out, _ = artifact
    f = out / COMPRESSED_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="compressed.safetensors does not match its sha256"):
        read_compressed_tensors(out)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelDirError, match="compressed.safetensors has .* truncated"):
        read_compressed_tensors(out)


def test_inconsistent_manifest_is_an_error(artifact: tuple[Path, dict]) -> None:
    out, _ = artifact
    manifest = json.loads((out / "manifest.json").read_text())
    good = json.dumps(manifest)
    # A part the description does not match (raw size lie), checksums otherwise intact.
    q_meta = manifest["compression"]["tensors"]["layers.0.self_attn.q_proj.weight"]
    q_meta["parts"]["qweight"]["raw_bytes"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="q_proj.weight' does not decode"):
        read_compressed_tensors(out)
    manifest = json.loads(good)
    del manifest["compression"]["tensors"]["layers.0.self_attn.q_proj.weight"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="parts no manifest entry describes"):
        read_compressed_tensors(out)


def test_existing_output_needs_overwrite_and_failed_write_leaves_nothing(
    artifact: tuple[Path, dict], tiny_model_dir: Path
) -> None:
    out, tensors = artifact
    with pytest.raises(ModelDirError, match="already exists"):
        write_compressed_model_dir(out, tiny_model_dir, tensors, RECIPE, {})
    bad = dict(tensors)
    bad["layers.0.mlp.up_proj.weight"] = object()  # fails mid-write
    target = out.parent / "never"
    with pytest.raises(AttributeError):
        write_compressed_model_dir(target, tiny_model_dir, bad, RECIPE, {})
    assert not target.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    shutil.rmtree(out)
