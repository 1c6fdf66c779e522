"""Read and write safetensors weights: single file or shards with an index, errors that name files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastserve_ray.errors import ModelDirError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a directory: the single file, or every shard its index names."""
    single, index = model_dir / WEIGHTS_FILE, model_dir / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelDirError(f"{index} is not a valid safetensors index ({e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelDirError(f"{f} is named by {index} but does not exist")
        return files
    raise ModelDirError(f"{model_dir} has no {WEIGHTS_FILE} or {INDEX_FILE}")


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's safetensors file(s), on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelDirError(f"{f} is not a readable safetensors file: {e}") from None
    return tensors


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied weights stored once (safetensors forbids aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = t.data_ptr()
        if key in seen:  # the tied lm_head: rebuilt from the embedding on load
            continue
        seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors to one safetensors file."""
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_into_model(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``tensors`` into ``model``, naming any missing, unexpected or misshapen tensor."""
    expected = {name: t for name, t in state_dict_for_saving(model).items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        raise ModelDirError(
            f"weights in {source} do not match the config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in tensors.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise ModelDirError(
                f"tensor {name!r} in {source} has shape {tuple(t.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
