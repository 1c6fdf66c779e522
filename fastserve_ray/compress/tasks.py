"""The compression pipeline's task bodies: plain functions of tensors and paths.

graph.py runs them as Ray tasks (ObjectRefs as arguments), serial.py calls them in one process.
Every one is deterministic in its inputs, so a retried task returns the same bytes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve_ray.compress.artifact import write_encoded_model_dir
from fastserve_ray.compress.calibration import block_output, block_statistics, embed_rows, load_token_rows
from fastserve_ray.compress.codec import EncodedTensor, decode, encode
from fastserve_ray.compress.prune import global_magnitude_threshold
from fastserve_ray.compress.qtensor import QuantizedWeight
from fastserve_ray.compress.recipe import LayerPlan
from fastserve_ray.compress.stages import Stats, compress_weight
from fastserve_ray.config import ModelConfig
from fastserve_ray.models.evaluate import evaluate_rows
from fastserve_ray.models.factory import build_empty_model
from fastserve_ray.models.model_dir import TOKENIZER_FILE, read_config, read_manifest
from fastserve_ray.models.weights import load_into_model, load_tensors
from fastserve_ray.tokenizer import Tokenizer

Value = torch.Tensor | QuantizedWeight | EncodedTensor


def load_weights(model_dir: str, names: list[str]) -> tuple[torch.Tensor, ...]:
    """The source model's tensors in ``names`` order (checksums verified)."""
    read_manifest(model_dir, verify=True)
    tensors = load_tensors(Path(model_dir))
    return tuple(tensors[n] for n in names)


def token_rows(model_dir: str, data_dir: str | None, num_calibration: int, num_validation: int,
               seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows, validation rows) from the data directory or the built-in corpus."""
    config = read_config(model_dir)
    tokenizer = Tokenizer.load(Path(model_dir) / TOKENIZER_FILE)
    data = load_token_rows(config, tokenizer, data_dir, num_calibration, num_validation, seq_len)
    return data.calibration, data.validation


def embed(embedding: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Hidden states entering the first decoder block."""
    return embed_rows(embedding, np.array(rows))  # object-store arrays are read-only: copy


def _dense(value: Value) -> torch.Tensor:
    if isinstance(value, EncodedTensor):
        value = decode(value)
    if isinstance(value, QuantizedWeight):
        return value.dequantize(torch.float32)
    return value


def calibrate_block(config: dict[str, Any], block: int, local_names: list[str], *args: Any) -> tuple:
    """Input statistics of the block's linears (``local_names`` order after the params) + its output.

    ``args`` = the block's parameters (sorted by name) followed by the block's input hidden states.
    """
    cfg = ModelConfig.from_dict(config, where="config")
    *params, hidden = args
    state = dict(zip(_param_names(cfg, block), params))
    stats, out = block_statistics(cfg, state, hidden)
    return (*(stats[n] for n in local_names), out)


def run_block(config: dict[str, Any], block: int, *args: Any) -> torch.Tensor:
    """The block's output with (possibly compressed) parameters: feeds the next block's calibration."""
    cfg = ModelConfig.from_dict(config, where="config")
    *params, hidden = args
    state = {n: _dense(v) for n, v in zip(_param_names(cfg, block), params)}
    return block_output(cfg, state, hidden)


def _param_names(cfg: ModelConfig, block: int) -> list[str]:
    """A decoder block's parameter names relative to it, sorted (the order callers pass them in)."""
    from fastserve_ray.models.llama import DecoderLayer

    with torch.device("meta"):
        return sorted(n for n, _ in DecoderLayer(cfg).named_parameters())


def global_threshold(sparsity: float, *weights: torch.Tensor) -> float:
    """The magnitude threshold shared by all layers of a global pruning."""
    return global_magnitude_threshold(list(weights), sparsity)


def compress(weight: torch.Tensor, plan: LayerPlan, stats: Stats | None, threshold: float | None,
             fault: tuple[str, str] | None = None) -> torch.Tensor | QuantizedWeight:
    """Prune and/or quantize one weight (``fault`` is a test hook: see graph.run_graph)."""
    if fault is not None and fault[0] == plan.name and not os.path.exists(fault[1]):
        Path(fault[1]).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)  # die mid-task, as a crashed or preempted worker would
    return compress_weight(weight, plan, stats, threshold)


def encode_weight(value: torch.Tensor | QuantizedWeight, layout: str) -> EncodedTensor:
    """Bit-pack, lay out the sparsity and zstd one compressed weight."""
    return encode(value, layout)


def evaluate(config: dict[str, Any], rows: np.ndarray, names: list[str], *values: Value) -> dict[str, float]:
    """Validation perplexity of the model made of ``values`` (decoded and dequantized as needed)."""
    cfg = ModelConfig.from_dict(config, where="config")
    model = build_empty_model(cfg)
    load_into_model(model, {n: _dense(v) for n, v in zip(names, values)}, Path("<compressed tensors>"))
    return evaluate_rows(model, np.array(rows), batch_size=8)


def write_artifact(out_dir: str, source_dir: str, recipe: dict[str, Any], overwrite: bool,
                   float_names: list[str], encoded_names: list[str], eval_before: dict | None,
                   eval_after: dict | None, *values: Any) -> str:
    """Write the compressed model directory (atomically): float tensors, then encoded ones."""
    floats = dict(zip(float_names, values[: len(float_names)]))
    encoded = dict(zip(encoded_names, values[len(float_names):]))
    extra: dict[str, Any] = {}
    if eval_before is not None and eval_after is not None:
        extra["eval"] = {"before": eval_before, "after": eval_after,
                         "perplexity_ratio": eval_after["perplexity"] / eval_before["perplexity"]}
    out = write_encoded_model_dir(out_dir, source_dir, floats, encoded, recipe, extra, overwrite=overwrite)
    return str(out)
