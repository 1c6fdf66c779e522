"""Calibration and evaluation tokens, and per-layer input statistics of a Llama-style block.

Token rows come from a prepared data directory (train split for calibration, validation split for
evaluation) or, without one, from the built-in corpus tokenized with the model's own tokenizer.
Statistics are the Gram matrix X^T X of every linear layer's input over all calibration tokens
(and the token count): GPTQ's Hessian is 2/n X^T X and Wanda's input norm is sqrt(diag(X^T X)).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastserve_ray.config import ModelConfig
from fastserve_ray.data import check_data_fits_model, read_split
from fastserve_ray.data.corpus import builtin_documents
from fastserve_ray.data.manifest import load_data_manifest
from fastserve_ray.data.packing import RowPacker, encode_documents, validation_mask
from fastserve_ray.errors import DataError
from fastserve_ray.layers.rotary import RotaryEmbedding
from fastserve_ray.models.llama import DecoderLayer
from fastserve_ray.storage import is_uri
from fastserve_ray.tokenizer import Tokenizer

ROW_BATCH = 8  # rows per forward pass: bounds attention memory


@dataclass
class CalibrationData:
    """Token rows (rows, seq_len + 1): calibration inputs and validation rows for perplexity."""

    calibration: np.ndarray
    validation: np.ndarray
    source: str


def load_token_rows(
    config: ModelConfig,
    tokenizer: Tokenizer,
    data_dir: str | Path | None,
    num_calibration_rows: int,
    num_validation_rows: int,
    seq_len: int,
) -> CalibrationData:
    """Rows from ``data_dir`` (train / validation splits), else from the built-in corpus."""
    if data_dir is not None:
        manifest = load_data_manifest(data_dir)
        check_data_fits_model(manifest, config, tokenizer)
        calib = read_split(data_dir, "train")[:num_calibration_rows, : seq_len + 1]
        val = read_split(data_dir, "validation")[:num_validation_rows, : seq_len + 1]
        source = str(data_dir) if is_uri(data_dir) else str(Path(data_dir).resolve())
    else:
        calib, val = _builtin_rows(tokenizer, num_calibration_rows, num_validation_rows, seq_len)
        source = "builtin:docs"
    if len(calib) == 0 or len(val) == 0:
        raise DataError(f"{source}: need calibration and validation rows, got {len(calib)} and {len(val)}")
    return CalibrationData(np.ascontiguousarray(calib), np.ascontiguousarray(val), source)


def _builtin_rows(tokenizer: Tokenizer, num_calib: int, num_val: int, seq_len: int):
    if tokenizer.eos_id is None:
        raise DataError("the model's tokenizer has no end-of-sequence token to separate documents")
    packer = RowPacker(seq_len)
    calib, val = [], []
    num_rows = 0
    blocks = encode_documents(tokenizer, builtin_documents("docs"), tokenizer.eos_id)
    for tokens, doc_ids in blocks:
        rows, _ = packer.add(tokens, doc_ids)
        is_val = validation_mask(num_rows, len(rows), 0.1)  # every 10th row, as prepare-data does
        num_rows += len(rows)
        calib.extend(rows[~is_val])
        val.extend(rows[is_val])
        if len(calib) >= num_calib and len(val) >= num_val:
            break
    empty = np.empty((0, seq_len + 1), dtype=np.int32)
    return (np.stack(calib[:num_calib]) if calib else empty), (np.stack(val[:num_val]) if val else empty)


# -- block statistics -----------------------------------------------------------------------------


def block_prefix(index: int) -> str:
    """State-dict prefix of decoder block ``index``."""
    return f"layers.{index}."


def build_block(config: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[DecoderLayer, RotaryEmbedding]:
    """A DecoderLayer holding ``state`` (names relative to the block) and the rotary table."""
    layer = DecoderLayer(config)
    layer.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return layer.eval(), RotaryEmbedding(config.head_dim, config.rope_theta)


def _forward(layer: DecoderLayer, rotary: RotaryEmbedding, x: torch.Tensor) -> torch.Tensor:
    # The residual block exactly as LlamaModel.forward runs it.
    cos, sin = rotary(torch.arange(x.shape[1]), x.dtype)
    x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
    return x + layer.mlp(layer.post_attention_layernorm(x))


@torch.no_grad()
def embed_rows(embedding: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """The first block's input: embeddings of the rows' input tokens (rows, seq_len, dim)."""
    return torch.nn.functional.embedding(torch.as_tensor(rows[:, :-1], dtype=torch.int64),
                                         embedding.to(torch.float32))


@torch.no_grad()
def block_statistics(
    config: ModelConfig, state: dict[str, torch.Tensor], hidden: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, tuple[torch.Tensor, int]], torch.Tensor]:
    """Input Gram matrices of every linear in the block (names relative to it) and the block output.

    The Grams are accumulated in float64 and returned in ``dtype``: float64 for partial sums
    over a chunk of the rows (so that adding the chunks loses nothing), float32 for a final one.
    """
    layer, rotary = build_block(config, state)
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    # q/k/v (and gate/up) see one input tensor: one product for all. Holding the tensor keeps
    # its id from being reused by a later input within the batch.
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod, args, name=name):
                key = id(args[0])
                if key not in shared:
                    x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
                    shared[key] = (args[0], x.T @ x)
                grams[name] = grams.get(name, 0) + shared[key][1]
                counts[name] = counts.get(name, 0) + args[0].numel() // args[0].shape[-1]
            hooks.append(module.register_forward_pre_hook(hook))
    outs = []
    try:
        for start in range(0, hidden.shape[0], ROW_BATCH):
            outs.append(_forward(layer, rotary, hidden[start : start + ROW_BATCH]))
            shared.clear()
    finally:
        for h in hooks:
            h.remove()
    stats = {f"{name}.weight": (grams[name].to(dtype), counts[name]) for name in sorted(grams)}
    return stats, torch.cat(outs)


@torch.no_grad()
def block_output(config: ModelConfig, state: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The block's output for ``hidden`` (used to feed compressed blocks' outputs onward)."""
    layer, rotary = build_block(config, state)
    return torch.cat([_forward(layer, rotary, hidden[s : s + ROW_BATCH])
                      for s in range(0, hidden.shape[0], ROW_BATCH)])


