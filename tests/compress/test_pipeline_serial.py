"""The pipeline run serially (no Ray): global magnitude pruning and a recurrent model's int8 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastserve_ray.compress.pipeline import CompressOptions
from fastserve_ray.compress.recipe import load_recipe
from fastserve_ray.compress.serial import run_serial
from fastserve_ray.models import build_model, get_preset, save_model_dir
from fastserve_ray.quantized.artifact import read_compressed_tensors
from fastserve_ray.quantized.qtensor import QuantizedWeight
from fastserve_ray.tokenizer import Tokenizer

SMALL = CompressOptions(num_calibration_rows=4, num_validation_rows=4, seq_len=32)


def test_global_magnitude_prunes_the_requested_fraction_overall(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe_file = tmp_path / "global.yaml"
    recipe_file.write_text(
        "sparsity_stage:\n  sparsity_modifiers:\n    MagnitudePruningModifier:\n"
        "      ignore: [lm_head]\n      sparsity: 0.6\n      scope: global\n"
    )
    result = run_serial(tiny_model_dir, tmp_path / "out", load_recipe(recipe_file), options=SMALL, quiet=True)
    tensors, compression = read_compressed_tensors(result.out_dir)
    pruned = [tensors[n] for n in compression["tensors"]]
    zeros = sum(int((w == 0).sum()) for w in pruned)
    total = sum(w.numel() for w in pruned)
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    # One threshold for all: layers with smaller weights (o_proj/down_proj, scaled init) lose more.
    frac = {n: float((tensors[n] == 0).float().mean()) for n in compression["tensors"]}
    assert frac["layers.0.self_attn.o_proj.weight"] > frac["layers.0.self_attn.q_proj.weight"]


def test_recurrent_model_gets_int8_weight_matrices(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    torch.manual_seed(0)
    src = save_model_dir(tmp_path / "lstm", build_model(get_preset("lstm-tiny")), tiny_tokenizer)
    result = run_serial(src, tmp_path / "out", load_recipe("int8"), options=SMALL, quiet=True)
    tensors, _ = read_compressed_tensors(result.out_dir)
    w = tensors["rnn.weight_hh_l1"]
    assert isinstance(w, QuantizedWeight) and w.bits == 8 and w.shape == (4 * 64, 64)
    assert result.report["eval"]["perplexity_ratio"] == pytest.approx(1.0, abs=0.01)


def test_the_artifact_lineage_records_the_data_that_calibrated_it(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Tokenizer
) -> None:
    import json

    from fastserve_ray.data import prepare_data
    from fastserve_ray.data.manifest import MANIFEST_NAME
    from fastserve_ray.tokenizer import file_sha256

    data = tmp_path / "data"
    prepare_data(data, tokenizer_path=tiny_tokenizer.path, seq_len=32, progress=False)
    result = run_serial(
        tiny_model_dir, tmp_path / "gptq", load_recipe("int4-gptq-g64"), data, SMALL, quiet=True
    )
    lineage = json.loads((result.out_dir / "manifest.json").read_text())["lineage"]
    record = lineage["compression_data"]
    assert record["data"] == str(data.resolve())
    assert record["data_manifest_sha256"] == file_sha256(data / MANIFEST_NAME)
    assert record["num_calibration_rows"] == 4 and record["used_for"] == "calibration and evaluation"
    assert lineage["source_lineage"] == {"note": "test fixture"}  # the model's own lineage kept
    free = run_serial(tiny_model_dir, tmp_path / "int8", load_recipe("int8"), options=SMALL, quiet=True)
    record = json.loads((free.out_dir / "manifest.json").read_text())["lineage"]["compression_data"]
    assert record["data"] == "builtin:docs" and record["data_manifest_sha256"] is None
    assert record["num_calibration_rows"] == 0 and record["used_for"] == "evaluation"
