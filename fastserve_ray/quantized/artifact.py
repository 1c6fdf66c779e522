"""The compressed model directory: a normal model directory plus encoded tensors.

    config.json, tokenizer.json    copied byte for byte from the source model
    model.safetensors              every tensor that is not compressed, in float, under its name
    compressed.safetensors         uint8 parts of each compressed parameter, named "<param>.<part>"
    manifest.json                  sha256 of every file + "compression": recipe, source, tensors, eval
    report.json                    the run's report (timings), written last, not checksummed

A reader verifies the checksums, decodes every part exactly (codec.py) and checks the result
against the model config, so a truncated, bit-flipped or inconsistent file is a ModelDirError
naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fastserve_ray.atomic import atomic_directory
from fastserve_ray.errors import ModelDirError
from fastserve_ray.models.factory import build_model
from fastserve_ray.models.model_dir import (
    CONFIG_FILE,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    read_config,
    read_manifest,
    write_manifest,
)
from fastserve_ray.models.model_store import check_output_location, is_remote, local_model_dir, model_output
from fastserve_ray.models.weights import WEIGHTS_FILE, load_tensors, save_tensors
from fastserve_ray.quantized.codec import CodecError, EncodedTensor, decode, encode, is_2of4
from fastserve_ray.quantized.qtensor import QuantizedWeight
from fastserve_ray.tokenizer import SIDE_FILES, file_sha256

COMPRESSED_FILE = "compressed.safetensors"
REPORT_FILE = "report.json"
COMPRESSION_FORMAT_VERSION = 1


class CompressedArtifactError(ModelDirError):
    """A compressed model directory is corrupt or does not match its manifest or config."""


def is_compressed_model_dir(path: str | Path) -> bool:
    """True when ``path`` is a model directory whose manifest has a "compression" section."""
    try:
        if is_remote(path):
            return "compression" in read_manifest(path, verify=False)
        return "compression" in json.loads((Path(path) / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError, TypeError, ModelDirError):
        return False


def auto_sparsity(value: torch.Tensor | QuantizedWeight) -> str:
    """The sparsity layout that stores ``value`` smallest: "2:4", "unstructured" or "none"."""
    t = value.q if isinstance(value, QuantizedWeight) else value
    density = float((t != 0).float().mean()) if t.numel() else 1.0
    if density <= 0.5 and is_2of4(t):
        return "2:4"
    bits = value.bits if isinstance(value, QuantizedWeight) else t.element_size() * 8
    # A bitmask costs 1 bit per weight and saves `bits` per zero.
    return "unstructured" if density < 1 - 1 / bits else "none"


def write_compressed_model_dir(
    out_dir: str | Path,
    source_dir: str | Path,
    tensors: dict[str, torch.Tensor | QuantizedWeight],
    recipe: dict[str, Any],
    extra: dict[str, Any],
    sparsity: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Encode and write ``tensors`` as a compressed model directory (atomically).

    QuantizedWeights are always encoded; a float tensor is encoded as a sparse weight when
    ``sparsity`` names a layout for it, and stored as plain float otherwise.
    """
    sparsity = sparsity or {}
    encoded: dict[str, EncodedTensor] = {}
    floats: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        layout = sparsity.get(name)
        if isinstance(value, QuantizedWeight):
            encoded[name] = encode(value, layout or auto_sparsity(value))
        elif layout and layout != "none":
            encoded[name] = encode(value, layout)
        else:
            floats[name] = value
    return write_encoded_model_dir(out_dir, source_dir, floats, encoded, recipe, extra, overwrite=overwrite)


def write_encoded_model_dir(
    out_dir: str | Path,
    source_dir: str | Path,
    floats: dict[str, torch.Tensor],
    encoded: dict[str, EncodedTensor],
    recipe: dict[str, Any],
    extra: dict[str, Any],
    overwrite: bool = False,
    report: dict[str, Any] | None = None,
    lineage_extra: dict[str, Any] | None = None,
) -> Path | str:
    """Write already-encoded tensors (and the float rest) as a compressed model dir, atomically.

    Either directory may be a URI (``s3://...``): the source is read through this node's cache,
    the output written locally and uploaded with its manifest last.
    The manifest's lineage names the source (and carries its lineage) plus ``lineage_extra``."""
    source_name = _location_name(source_dir)
    if source_name == _location_name(out_dir):
        raise ModelDirError(f"{out_dir}: the output directory must differ from the source model")
    source_dir = local_model_dir(source_dir)
    source_manifest = read_manifest(source_dir, verify=False)
    check_output_location(out_dir, overwrite)
    clash = sorted(set(floats) & set(encoded))
    if clash:
        raise ValueError(f"tensors {clash} are given both as float and as encoded")
    with model_output(out_dir) as local_out, atomic_directory(local_out) as tmp:
        shutil.copyfile(source_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        shutil.copyfile(source_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        for name in SIDE_FILES:  # the chat template and generation config go with the tokenizer
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        float_state = {k: v.detach().cpu().contiguous() for k, v in sorted(floats.items())}
        save_tensors(float_state, tmp / WEIGHTS_FILE)
        parts = {f"{name}.{part}": data for name, enc in sorted(encoded.items())
                 for part, data in sorted(enc.parts.items())}
        save_tensors(parts, tmp / COMPRESSED_FILE)
        lineage = {"compressed_from": source_name,
                   "source_lineage": source_manifest.get("lineage", {}), **(lineage_extra or {})}
        manifest = write_manifest(tmp, lineage)
        manifest["compression"] = {
            "format_version": COMPRESSION_FORMAT_VERSION,
            "recipe": recipe,
            "source": {"path": source_name,
                       "manifest_sha256": file_sha256(source_dir / MANIFEST_FILE)},
            "tensors": {name: enc.meta for name, enc in sorted(encoded.items())},
            **extra,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return str(out_dir) if is_remote(out_dir) else Path(out_dir)


def _location_name(location: str | Path) -> str:
    """How lineage names a model directory: a URI as given, a local path absolute."""
    return str(location).rstrip("/") if is_remote(location) else str(Path(location).resolve())


def _expected_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes the config needs (the tied head is stored once, as the embedding)."""
    config = read_config(model_dir)
    with torch.device("meta"):
        model = build_model(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def read_compressed_tensors(
    model_dir: str | Path, verify: bool = True
) -> tuple[dict[str, torch.Tensor | QuantizedWeight], dict[str, Any]]:
    """Every parameter (float tensors and QuantizedWeights) and the manifest's "compression" dict."""
    model_dir = local_model_dir(model_dir)
    manifest = read_manifest(model_dir, verify=verify)
    compression = manifest.get("compression")
    mpath = model_dir / MANIFEST_FILE
    if not isinstance(compression, dict) or not isinstance(compression.get("tensors"), dict):
        raise CompressedArtifactError(f"{mpath} has no valid 'compression' section: not a compressed model")
    tensors: dict[str, torch.Tensor | QuantizedWeight] = dict(load_tensors(model_dir))
    cpath = model_dir / COMPRESSED_FILE
    try:
        parts = load_file(str(cpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CompressedArtifactError(f"{cpath} is not a readable safetensors file: {e}") from None

    used: set[str] = set()
    for name, meta in compression["tensors"].items():
        if name in tensors:
            raise CompressedArtifactError(
                f"{cpath}: {name!r} is stored both compressed and in {WEIGHTS_FILE}")
        part_names = meta.get("parts", {}) if isinstance(meta, dict) else {}
        mine = {p: parts.get(f"{name}.{p}") for p in part_names}
        missing = [p for p, t in mine.items() if t is None]
        if missing or not part_names:
            raise CompressedArtifactError(
                f"{cpath}: tensor {name!r} lacks parts {missing or '(none described)'}")
        for p, t in mine.items():
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise CompressedArtifactError(
                    f"{cpath}: part {name}.{p} is {t.dtype} {tuple(t.shape)}, not uint8 bytes")
        used.update(f"{name}.{p}" for p in mine)
        try:
            tensors[name] = decode(EncodedTensor(mine, meta))  # type: ignore[arg-type]
        except (CodecError, KeyError, TypeError, ValueError) as e:
            raise CompressedArtifactError(f"{cpath}: tensor {name!r} does not decode: {e}") from None
    unexpected = sorted(set(parts) - used)
    if unexpected:
        raise CompressedArtifactError(f"{cpath} holds parts no manifest entry describes: {unexpected[:5]}")

    expected = _expected_shapes(model_dir)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CompressedArtifactError(
            f"{model_dir}: tensors do not match {CONFIG_FILE}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in tensors.items():
        if tuple(value.shape) != expected[name]:
            raise CompressedArtifactError(
                f"{model_dir}: tensor {name!r} has shape {tuple(value.shape)}, "
                f"{CONFIG_FILE} needs {expected[name]}")
    return tensors, compression
