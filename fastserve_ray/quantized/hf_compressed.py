"""Quantized checkpoints in the compressed-tensors ``pack-quantized`` format, both ways.

That format (llm-compressor's output, loaded as it is by transformers and vLLM) stores each
quantized Linear as three tensors next to its float siblings:

    <module>.weight_packed  int32 [N, ceil(K * bits / 32)]  (q + 2^(bits-1)) as a dense little-endian
                                                             bit stream: element i at bit i * bits
    <module>.weight_scale   float [N, K // group_size]      ([N, 1] for per-channel, "channel")
    <module>.weight_shape   int64 [2]                        (N, K)

and declares the scheme under ``quantization_config`` in config.json (symmetric int weights,
strategy "group" or "channel", no activation quantization: W8A16 / W4A16). Export writes our
compressed directory that way; import reads such a checkpoint into a compressed directory
whose quantized layers keep their exact integers and scales.

The CLI's ``export-hf`` / ``import-hf`` call ``export_hf`` / ``import_hf`` here, which pick
this format or the plain one (``models.hf``): models/ knows nothing about compression.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve_ray.atomic import atomic_directory
from fastserve_ray.errors import ModelDirError
from fastserve_ray.models import hf as plain_hf
from fastserve_ray.models.model_dir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    check_tokenizer_fits,
    read_config,
    write_manifest,
)
from fastserve_ray.models.model_store import check_output_location, is_remote, local_model_dir, model_output
from fastserve_ray.models.weights import load_tensors, save_tensors
from fastserve_ray.quantized.artifact import (
    is_compressed_model_dir,
    read_compressed_tensors,
    write_compressed_model_dir,
)
from fastserve_ray.quantized.qtensor import QuantizedWeight
from fastserve_ray.tokenizer import SIDE_FILES, Tokenizer

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
Unsupported = plain_hf.UnsupportedCheckpointError


# -- packing ---------------------------------------------------------------------------------

def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit q [N, K] -> int32 [N, ceil(K*bits/32)], compressed-tensors' dense layout."""
    n, k = q.shape
    u = (q.to(torch.int32) + (1 << (bits - 1))).numpy().astype(np.uint32)
    bitplanes = ((u[:, :, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)  # LSB first
    stream = bitplanes.reshape(n, k * bits)
    words = math.ceil(k * bits / 32)
    stream = np.pad(stream, ((0, 0), (0, words * 32 - k * bits)))
    packed = np.packbits(stream, axis=1, bitorder="little")  # bit j of byte b = stream bit 8b + j
    return torch.from_numpy(packed.view("<i4").astype(np.int32).reshape(n, words))


def unpack_int32(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: int8 [N, K]."""
    n = packed.shape[0]
    raw = packed.contiguous().numpy().astype("<i4").view(np.uint8).reshape(n, -1)
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, : k * bits].reshape(n, k, bits)
    u = (stream.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=2)
    return torch.from_numpy((u - (1 << (bits - 1))).astype(np.int8))


# -- export ----------------------------------------------------------------------------------

def _scheme(qw: QuantizedWeight) -> tuple[int, str, int | None]:
    k = qw.shape[1]
    return (qw.bits, "channel", None) if qw.group_size == k else (qw.bits, "group", qw.group_size)


def _weights_args(bits: int, strategy: str, group_size: int | None) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy,
            "group_size": group_size, "dynamic": False, "actorder": None, "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


def quantization_config(quantized: dict[str, QuantizedWeight], linear_modules: list[str]) -> dict[str, Any]:
    """config.json's quantization_config for HF module names -> their QuantizedWeight."""
    schemes: dict[tuple, list[str]] = {}
    for module, qw in sorted(quantized.items()):
        schemes.setdefault(_scheme(qw), []).append(module)
    groups = {}
    for i, (scheme, modules) in enumerate(sorted(schemes.items(), key=lambda kv: kv[1][0])):
        # One scheme for every quantized layer: the usual "Linear" target; several: exact names.
        targets = ["Linear"] if len(schemes) == 1 else modules
        groups[f"group_{i}"] = {"targets": targets, "weights": _weights_args(*scheme),
                                "input_activations": None, "output_activations": None,
                                "format": PACK_FORMAT}
    return {
        "quant_method": QUANT_METHOD,
        "format": PACK_FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(m for m in linear_modules if m not in quantized),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def export_hf_compressed(model_dir: str | Path, hf_dir: str | Path, overwrite: bool = False) -> Path | str:
    """Write a compressed model directory as a compressed-tensors pack-quantized HF checkpoint."""
    model_dir = local_model_dir(model_dir)
    tensors, _ = read_compressed_tensors(model_dir)
    config = read_config(model_dir)
    tokenizer = Tokenizer.load(model_dir / TOKENIZER_FILE)
    hf_config = plain_hf.config_to_hf(config, tokenizer)  # refuses recurrent models, naming them
    out: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    linear_modules = ["lm_head"] + [
        f"model.layers.{i}.{m}" for i in range(config.n_layers)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    for name, value in sorted(tensors.items()):
        hf_name = name if name.startswith("lm_head") else f"model.{name}"
        module = hf_name.removesuffix(".weight")
        if isinstance(value, QuantizedWeight) and module in linear_modules:
            quantized[module] = value
            out[f"{module}.weight_packed"] = pack_int32(value.q, value.bits)
            out[f"{module}.weight_scale"] = value.scale.to(torch.float32).contiguous()
            out[f"{module}.weight_shape"] = torch.tensor(value.shape, dtype=torch.int64)
        elif isinstance(value, QuantizedWeight):  # e.g. a quantized embedding: no Linear to hold it
            out[hf_name] = value.dequantize(torch.float32)
        else:
            out[hf_name] = value
    hf_config["quantization_config"] = quantization_config(quantized, linear_modules)
    return _write_hf_dir(hf_dir, out, hf_config, tokenizer, overwrite)


def _write_hf_dir(hf_dir: str | Path, tensors: dict[str, torch.Tensor], hf_config: dict[str, Any],
                  tokenizer: Tokenizer, overwrite: bool) -> Path | str:
    check_output_location(hf_dir, overwrite)
    with model_output(hf_dir) as local, atomic_directory(local) as tmp:
        save_tensors(tensors, tmp / "model.safetensors")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        plain_hf.write_hf_tokenizer(tokenizer, tmp)
    return str(hf_dir) if is_remote(hf_dir) else Path(hf_dir)


# -- import ----------------------------------------------------------------------------------

def _check_quantization_config(qc: Any, where: Path) -> list[dict[str, Any]]:
    """The weight schemes of a pack-quantized W*A16 config; anything else is a clear error."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise Unsupported(
            f"{where}: quantization_config.quant_method {method!r} is not supported (only {QUANT_METHOD!r})")
    groups = qc.get("config_groups") or {}
    schemes = []
    for gname, group in groups.items():
        fmt = group.get("format") or qc.get("format")
        w = group.get("weights") or {}
        what = f"{where}: quantization_config.config_groups.{gname}"
        if fmt != PACK_FORMAT:
            raise Unsupported(f"{what}.format {fmt!r} is not supported ({PACK_FORMAT!r})")
        if group.get("input_activations") or group.get("output_activations"):
            raise Unsupported(f"{what}: activation quantization is not supported")
        if w.get("type", "int") != "int" or not w.get("symmetric", True):
            raise Unsupported(f"{what}.weights: only symmetric int weights are supported")
        if w.get("strategy") not in ("group", "channel") or w.get("num_bits") not in (3, 4, 8):
            raise Unsupported(
                f"{what}.weights: strategy {w.get('strategy')!r} with num_bits {w.get('num_bits')!r} is not "
                "supported (group or channel, 3/4/8 bits)")
        schemes.append(w)
    if not schemes:
        raise Unsupported(f"{where}: quantization_config has no config_groups")
    return schemes


def import_hf_compressed(hf_dir: str | Path, model_dir: str | Path, overwrite: bool = False) -> Path:
    """Read a compressed-tensors pack-quantized checkpoint into a compressed model directory."""
    hf_dir, model_dir = Path(hf_dir), Path(model_dir)
    config_path = hf_dir / CONFIG_FILE
    hf = json.loads(config_path.read_text())
    qc = hf["quantization_config"]
    schemes = _check_quantization_config(qc, config_path)
    cfg = plain_hf.config_from_hf(hf, config_path)
    tokenizer_path = hf_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ModelDirError(f"{tokenizer_path} does not exist: fastserve-ray needs the fast-tokenizer file")
    check_tokenizer_fits(Tokenizer.load(tokenizer_path), cfg, str(hf_dir))
    raw = load_tensors(hf_dir)
    bits_by_module = _bits_by_module(qc, schemes, raw)
    tensors: dict[str, torch.Tensor | QuantizedWeight] = {}
    for name, t in raw.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        module, _, suffix = name.rpartition(".")
        if suffix in ("weight_scale", "weight_shape"):
            continue
        ours = (module if module.startswith("lm_head") else module.removeprefix("model.")) + ".weight"
        if suffix == "weight_packed":
            tensors[ours] = _quantized_weight(raw, module, bits_by_module[module], hf_dir)
        else:
            tensors[name.removeprefix("model.")] = t.to(torch.float32)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    with tempfile.TemporaryDirectory(prefix=".import-src-", dir=model_dir.parent if model_dir.parent.exists()
                                     else None) as src:
        # The artifact writer takes config and tokenizer from a source model directory.
        src = Path(src)
        (src / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        shutil.copyfile(hf_dir / TOKENIZER_FILE, src / TOKENIZER_FILE)
        for name in SIDE_FILES:  # chat template, special tokens, every EOS id
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, src / name)
        origin = {"path": str(hf_dir.resolve()), "format": f"{QUANT_METHOD}/{PACK_FORMAT}"}
        write_manifest(src, {"imported_from": {**origin, "model_type": hf["model_type"]}})
        recipe = {"imported": {"quantization_config": qc}}
        return write_compressed_model_dir(model_dir, src, tensors, recipe, {"source": origin},
                                          overwrite=overwrite)


def _bits_by_module(qc: dict[str, Any], schemes: list[dict[str, Any]], raw: dict[str, torch.Tensor]) -> dict:
    """num_bits of every packed module: from its group's explicit targets, else the only scheme."""
    by_module: dict[str, int] = {}
    for group in qc["config_groups"].values():
        for target in group.get("targets", []):
            by_module[target] = group["weights"]["num_bits"]
    packed = [n.removesuffix(".weight_packed") for n in raw if n.endswith(".weight_packed")]
    default = {s["num_bits"] for s in schemes}
    for module in packed:
        if module not in by_module:
            if len(default) != 1:
                raise Unsupported(
                    f"{module}: several bit widths in quantization_config and no group names this layer")
            by_module[module] = next(iter(default))
    return by_module


def _quantized_weight(raw: dict[str, torch.Tensor], module: str, bits: int, hf_dir: Path) -> QuantizedWeight:
    try:
        packed, scale = raw[f"{module}.weight_packed"], raw[f"{module}.weight_scale"]
        n, k = (int(v) for v in raw[f"{module}.weight_shape"].tolist())
    except KeyError as e:
        raise ModelDirError(f"{hf_dir}: {module} lacks {e}") from None
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, math.ceil(k * bits / 32)):
        raise ModelDirError(f"{hf_dir}: {module}.weight_packed is {packed.dtype} {tuple(packed.shape)}, "
                            f"expected int32 {(n, math.ceil(k * bits / 32))} for {bits}-bit [{n}, {k}]")
    if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ModelDirError(
            f"{hf_dir}: {module}.weight_scale has shape {tuple(scale.shape)} for weight [{n}, {k}]")
    q = unpack_int32(packed, bits, k)  # within qrange(bits) by construction
    return QuantizedWeight(q, scale.to(torch.float32).contiguous(), bits, k // scale.shape[1])


# -- dispatch (what the CLI calls) -------------------------------------------------------------

def export_hf(model_dir: str | Path, hf_dir: str | Path, overwrite: bool = False) -> Path | str:
    """Export any model directory: compressed ones as pack-quantized, plain ones as float.

    Either side may be a URI: the source is read through this node's cache, the checkpoint
    written locally and uploaded."""
    model_dir = local_model_dir(model_dir)
    if is_compressed_model_dir(model_dir):
        return export_hf_compressed(model_dir, hf_dir, overwrite=overwrite)
    return plain_hf.export_hf(model_dir, hf_dir, overwrite=overwrite)


def import_hf(hf_dir: str | Path, model_dir: str | Path, overwrite: bool = False) -> Path:
    """Import any HF checkpoint: a quantization_config makes a compressed model directory."""
    config_path = Path(hf_dir) / CONFIG_FILE
    try:
        quantized = "quantization_config" in json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        quantized = False  # the plain importer reports the missing or broken file
    if quantized:
        return import_hf_compressed(hf_dir, model_dir, overwrite=overwrite)
    return plain_hf.import_hf(hf_dir, model_dir, overwrite=overwrite)
