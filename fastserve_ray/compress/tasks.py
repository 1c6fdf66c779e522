"""The compression pipeline's task bodies: plain functions of tensors and paths.

graph.py runs them as Ray tasks (ObjectRefs as arguments), serial.py calls them in one process.
Every one is deterministic in its inputs, so a retried task returns the same bytes.

Activations (hidden states, Gram matrices, dense evaluation weights) cross task boundaries as
numpy arrays: Ray stores those zero-copy and a worker reads them in place (a read-only view),
while a torch tensor is pickled through torch's own serializer - measured here at ~50 ms to put
and ~8 ms to get 16 MB, against ~15 ms and <1 ms as numpy.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve_ray.compress.calibration import block_output, block_statistics, embed_rows, load_token_rows
from fastserve_ray.compress.prune import global_magnitude_threshold
from fastserve_ray.compress.recipe import LayerPlan
from fastserve_ray.compress.stages import Stats, compress_weight
from fastserve_ray.config import ModelConfig
from fastserve_ray.models.evaluate import evaluate_rows
from fastserve_ray.models.factory import build_empty_model
from fastserve_ray.models.model_dir import TOKENIZER_FILE, read_config, read_manifest
from fastserve_ray.models.model_store import local_model_dir
from fastserve_ray.models.weights import load_into_model, load_tensors
from fastserve_ray.quantized.artifact import write_encoded_model_dir
from fastserve_ray.quantized.codec import EncodedTensor, decode, encode
from fastserve_ray.quantized.qtensor import QuantizedWeight
from fastserve_ray.tokenizer import Tokenizer

Value = torch.Tensor | QuantizedWeight | EncodedTensor


def load_weights(model_dir: str, names: list[str]) -> tuple[torch.Tensor, ...]:
    """The source model's tensors in ``names`` order (checksums verified; a URI via the node's cache)."""
    local = local_model_dir(model_dir)
    read_manifest(local, verify=True)
    tensors = load_tensors(local)
    return tuple(tensors[n] for n in names)


def token_rows(model_dir: str, data_dir: str | None, num_calibration: int, num_validation: int,
               seq_len: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(calibration rows, validation rows, their counts) from the data directory or the built-in corpus.

    The counts are separate small results so the driver can size row chunks without fetching rows.
    """
    local = local_model_dir(model_dir)
    config = read_config(local)
    tokenizer = Tokenizer.load(local / TOKENIZER_FILE)
    data = load_token_rows(config, tokenizer, data_dir, num_calibration, num_validation, seq_len)
    return data.calibration, data.validation, len(data.calibration), len(data.validation)


def embed(embedding: torch.Tensor, rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Hidden states entering the first decoder block, for calibration rows ``lo:hi``."""
    return embed_rows(embedding, np.array(rows[lo:hi])).numpy()  # np.array: store arrays are read-only


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A writable torch tensor from an object-store array (those are read-only views: copy)."""
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def _dense(value: Value) -> torch.Tensor:
    if isinstance(value, EncodedTensor):
        value = decode(value)
    if isinstance(value, QuantizedWeight):
        return value.dequantize(torch.float32)
    return value


def calibrate_block(config: dict[str, Any], block: int, local_names: list[str], *args: Any) -> tuple:
    """Input statistics of the block's linears (``local_names`` order after the params) + its output.

    ``args`` = the block's parameters (sorted by name) followed by the block's input hidden states
    (one chunk of the calibration rows: the pipeline sums the chunks' statistics, see merge_stats).
    Each statistic is (float64 Gram matrix of this chunk as an array, token count).
    """
    cfg = ModelConfig.from_dict(config, where="config")
    *params, hidden = args
    state = dict(zip(_param_names(cfg, block), params))
    stats, out = block_statistics(cfg, state, _tensor(hidden), dtype=torch.float64)
    return (*((stats[n][0].numpy(), stats[n][1]) for n in local_names), out.numpy())


def run_block(config: dict[str, Any], block: int, *args: Any) -> np.ndarray:
    """The block's output with (possibly compressed) parameters: feeds the next block's calibration."""
    cfg = ModelConfig.from_dict(config, where="config")
    *params, hidden = args
    state = {n: _dense(v) for n, v in zip(_param_names(cfg, block), params)}
    return block_output(cfg, state, _tensor(hidden)).numpy()


def merge_stats(parts: tuple[tuple[np.ndarray | torch.Tensor, int], ...]) -> Stats | None:
    """One layer's statistics over all calibration rows from its per-chunk parts (None: no parts).

    X^T X over the union of rows is the sum over the chunks: float64 partials are added in chunk
    order and rounded to float32 once, as one pass over all rows would (a single part gives
    exactly its result; several, the same up to float64 rounding).
    """
    if not parts:
        return None
    gram = torch.zeros(np.shape(parts[0][0]), dtype=torch.float64)
    for g, _ in parts:
        gram += torch.as_tensor(np.asarray(g), dtype=torch.float64)
    return gram.to(torch.float32), sum(int(n) for _, n in parts)


def _param_names(cfg: ModelConfig, block: int) -> list[str]:
    """A decoder block's parameter names relative to it, sorted (the order callers pass them in)."""
    from fastserve_ray.models.llama import DecoderLayer

    with torch.device("meta"):
        return sorted(n for n, _ in DecoderLayer(cfg).named_parameters())


def global_threshold(sparsity: float, *weights: torch.Tensor) -> float:
    """The magnitude threshold shared by all layers of a global pruning."""
    return global_magnitude_threshold(list(weights), sparsity)


def compress(weight: torch.Tensor, plan: LayerPlan, threshold: float | None,
             fault: tuple[str, str] | None = None, *stats_parts: tuple[np.ndarray, int]
             ) -> torch.Tensor | QuantizedWeight:
    """Prune and/or quantize one weight (``fault`` is a test hook: see graph.run_graph).

    ``stats_parts``: the layer's input statistics per calibration chunk (none for data-free
    recipes); varargs, because Ray resolves ObjectRefs only at the top level of the arguments.
    """
    if fault is not None and fault[0] == plan.name and not os.path.exists(fault[1]):
        Path(fault[1]).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)  # die mid-task, as a crashed or preempted worker would
    return compress_weight(weight, plan, merge_stats(stats_parts), threshold)


def encode_weight(value: torch.Tensor | QuantizedWeight, layout: str) -> tuple[EncodedTensor, np.ndarray]:
    """Bit-pack, lay out the sparsity and zstd one compressed weight; also its decoded dense form.

    The dense float32 weight is decoded from the encoded bytes (what the artifact stores), here,
    once per weight and in parallel across weights, so that every evaluation chunk reads it from
    the object store instead of decoding the whole model again.
    """
    encoded = encode(value, layout)
    return encoded, _dense(encoded).numpy()


def evaluate(config: dict[str, Any], rows: np.ndarray, lo: int, hi: int, names: list[str],
             *values: Value | np.ndarray) -> dict[str, float]:
    """Summed next-token loss and token count of validation rows ``lo:hi`` (see merge_eval).

    ``values``: the model's tensors in ``names`` order, float tensors/arrays or compressed values.
    """
    cfg = ModelConfig.from_dict(config, where="config")
    model = build_empty_model(cfg)
    dense = {n: _tensor(v) if isinstance(v, np.ndarray) else _dense(v) for n, v in zip(names, values)}
    load_into_model(model, dense, Path("<compressed tensors>"))
    r = evaluate_rows(model, np.array(rows[lo:hi]), batch_size=8)
    return {"loss_sum": r["loss"] * r["num_tokens"], "num_tokens": r["num_tokens"]}


def merge_eval(*parts: dict[str, float]) -> dict[str, float]:
    """Mean loss and perplexity over all validation chunks from their summed losses."""
    tokens = sum(int(p["num_tokens"]) for p in parts)
    mean = sum(p["loss_sum"] for p in parts) / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "num_tokens": tokens}


def write_artifact(out_dir: str, source_dir: str, recipe: dict[str, Any], overwrite: bool,
                   float_names: list[str], encoded_names: list[str], eval_before: dict | None,
                   eval_after: dict | None, data_record: dict[str, Any], *values: Any) -> str:
    """Write the compressed model directory (atomically): float tensors, then encoded ones.

    ``data_record`` (which data calibrated or evaluated it) goes into the manifest's lineage."""
    floats = dict(zip(float_names, values[: len(float_names)]))
    encoded = dict(zip(encoded_names, values[len(float_names):]))
    extra: dict[str, Any] = {}
    if eval_before is not None and eval_after is not None:
        extra["eval"] = {"before": eval_before, "after": eval_after,
                         "perplexity_ratio": eval_after["perplexity"] / eval_before["perplexity"]}
    out = write_encoded_model_dir(out_dir, source_dir, floats, encoded, recipe, extra, overwrite=overwrite,
                                  lineage_extra={"compression_data": data_record})
    return str(out)
