"""The model directory: config.json + model.safetensors + tokenizer.json + manifest.json.

A tokenizer's side files (tokenizer_config.json with the chat template, generation_config.json,
chat_template.jinja) are kept beside tokenizer.json when it has them, listed in the manifest.

Every stage reads and writes one. manifest.json holds the sha256 and size of
every other file plus lineage (data, training run, compression recipe, evals);
loading verifies them so a truncated or altered file is a clear error.
Writes go to a temporary sibling directory renamed into place at the end.
Any of these functions also takes an object-store URI (``s3://...``): see model_store.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastserve_ray import __version__
from fastserve_ray.atomic import atomic_directory
from fastserve_ray.config import ModelConfig
from fastserve_ray.errors import FastServeError, ModelDirError
from fastserve_ray.models.factory import build_empty_model
from fastserve_ray.models.model_store import (
    check_output_location,
    is_remote,
    local_model_dir,
    model_output,
    read_remote_file,
)
from fastserve_ray.models.weights import (
    WEIGHTS_FILE,
    load_into_model,
    load_tensors,
    save_tensors,
    state_dict_for_saving,
)
from fastserve_ray.tokenizer import Tokenizer, file_sha256

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "fastserve-ray/model-dir"


@dataclass
class LoadedModel:
    """A model directory in memory."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    manifest: dict[str, Any]
    path: Path


def check_tokenizer_fits(tokenizer: Tokenizer, config: ModelConfig, where: str) -> None:
    """The tokenizer's ids must all index the model's embedding table."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelDirError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size} (tokenizer/model vocabulary mismatch)"
        )


def save_model_dir(
    out_dir: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    lineage: dict[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> Path | str:
    """Write ``model`` and ``tokenizer`` as a model directory with a checksummed manifest.

    ``out_dir`` may be a URI: the directory is then written locally and uploaded, manifest last.
    Returns ``out_dir`` (a Path when local)."""
    config: ModelConfig = model.config
    check_tokenizer_fits(tokenizer, config, str(out_dir))
    check_output_location(out_dir, overwrite)
    with model_output(out_dir) as local:
        _write_model_dir(local, model, tokenizer, lineage, extra_files)
    return str(out_dir) if is_remote(out_dir) else Path(out_dir)


def _write_model_dir(out_dir: Path, model: nn.Module, tokenizer: Tokenizer, lineage: dict[str, Any] | None,
                     extra_files: dict[str, Path] | None) -> None:
    config: ModelConfig = model.config
    with atomic_directory(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        save_tensors(state_dict_for_saving(model), tmp / WEIGHTS_FILE)
        if tokenizer.path is not None and tokenizer.path.is_file():
            # Byte for byte: re-serialising can change the bytes, and with them the sha256
            # that data manifests use to tie data to its tokenizer.
            shutil.copyfile(tokenizer.path, tmp / TOKENIZER_FILE)
        else:
            tokenizer.save(tmp / TOKENIZER_FILE)
        tokenizer.write_side_files(tmp)  # chat template, generation config (see tokenizer.py)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        write_manifest(tmp, lineage or {})


def write_manifest(model_dir: Path, lineage: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``model_dir`` (except the manifest) into manifest.json."""
    files = {
        p.name: {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "fastserve_ray_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "lineage": lineage,
    }
    (model_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(model_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """manifest.json of a model directory; with ``verify``, every listed file's size and sha256.

    A URI without ``verify`` reads the remote manifest only; with it, this node's verified copy."""
    if is_remote(model_dir):
        if not verify:
            try:
                return json.loads(read_remote_file(str(model_dir), MANIFEST_FILE))
            except json.JSONDecodeError as e:
                raise ModelDirError(f"{model_dir}/{MANIFEST_FILE} is not a valid manifest ({e})") from None
        model_dir = local_model_dir(model_dir)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        hint = ""
        if (model_dir / CONFIG_FILE).is_file() and "model_type" in (model_dir / CONFIG_FILE).read_text():
            hint = " (it looks like a Hugging Face checkpoint: run `fastserve-ray import-hf` first)"
        raise ModelDirError(f"{path} is missing: {model_dir} is not a fastserve-ray model directory{hint}")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelDirError(f"{path} is not a valid manifest ({e})") from None
    if verify:
        for name, meta in files.items():
            f = model_dir / name
            if not f.is_file():
                raise ModelDirError(f"{f} is listed in {MANIFEST_FILE} but missing")
            if f.stat().st_size != meta["size"]:
                raise ModelDirError(
                    f"{f} has {f.stat().st_size} bytes, the manifest says {meta['size']}: "
                    "the file was truncated or altered"
                )
            if file_sha256(f) != meta["sha256"]:
                raise ModelDirError(f"{f} does not match its sha256 in {MANIFEST_FILE}: the file was altered")
    return manifest


def read_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig stored in a model directory's config.json (read in place for a URI)."""
    remote = is_remote(model_dir)
    path = f"{str(model_dir).rstrip('/')}/{CONFIG_FILE}" if remote else Path(model_dir) / CONFIG_FILE
    try:
        text = read_remote_file(str(model_dir), CONFIG_FILE) if remote else path.read_text()
        data = json.loads(text)
    except FileNotFoundError:
        raise ModelDirError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON ({e})") from None
    try:
        return ModelConfig.from_dict(data, where=str(path))
    except FastServeError as e:
        raise ModelDirError(str(e)) from None


def load_model_dir(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> LoadedModel:
    """Load and verify a model directory (a URI: through this node's cache); eval mode on ``device``."""
    model_dir = local_model_dir(model_dir)
    manifest = read_manifest(model_dir, verify=verify)
    config = read_config(model_dir)
    tokenizer = Tokenizer.load(model_dir / TOKENIZER_FILE)
    check_tokenizer_fits(tokenizer, config, str(model_dir))
    model = build_empty_model(config)
    load_into_model(model, load_tensors(model_dir), model_dir)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, config, tokenizer, manifest, model_dir)


def lineage_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Where a model directory came from, in order: data -> training run -> compression -> evaluation.

    What ``GET /v1/models/{id}`` shows (``lineage``): the data directory and its manifest hash,
    the training run (config, final step and metrics, resumes, resizes), the compression recipe
    with its data and before/after perplexity when compressed, and the pipeline's evaluation.
    """
    lineage = manifest.get("lineage") or {}
    source = lineage.get("source_lineage", lineage)  # a compressed model carries its source's
    out: dict[str, Any] = {}
    if source.get("data") is not None:
        out["data"] = source["data"]
    training = source.get("training")
    if isinstance(training, dict):
        out["training"] = {k: training.get(k) for k in
                           ("run_name", "config", "final_step", "final_metrics", "resumes", "resizes")}
    compression = manifest.get("compression")
    if isinstance(compression, dict):
        out["compression"] = {"recipe": (compression.get("recipe") or {}).get("name"),
                              "from": lineage.get("compressed_from"),
                              "data": lineage.get("compression_data"), "eval": compression.get("eval")}
    if lineage.get("evaluation") is not None:
        out["evaluation"] = lineage["evaluation"]
    return out
