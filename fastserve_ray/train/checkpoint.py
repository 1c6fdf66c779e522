"""Pickle-free training checkpoints: safetensors for model and optimizer tensors, JSON for the rest.

A checkpoint directory holds
    model.safetensors      model weights (tied tensors once)
    optimizer.safetensors  AdamW moments and step counts, keyed by parameter name
    rng.safetensors        torch CPU RNG state
    train_state.json       step, data position, config, metrics history
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from fastserve_ray.errors import FastServeError
from fastserve_ray.models.weights import load_into_model, save_tensors
from fastserve_ray.train.parallel import full_tensor

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "train_state.json"


class CheckpointError(FastServeError):
    """A training checkpoint is missing a file or does not fit the model."""


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (tied weights once)."""
    by_id = {}
    for name, p in model.named_parameters():
        by_id.setdefault(id(p), name)
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Whole model and optimizer tensors on CPU, keyed by parameter name (tied weights once).

    With FSDP the tensors are all-gathered from the shards, so every worker must call this,
    in the same order; the result (and so the checkpoint) is the same as DDP's, which is what
    lets a run resume with another worker count or strategy.
    """
    model_tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # the tied lm_head: rebuilt from the embedding on load
            continue
        seen.add(id(t))
        model_tensors[name] = full_tensor(t)
    opt_tensors: dict[str, torch.Tensor] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, p in zip(_param_names(model, optimizer), params):
        for key, value in optimizer.state.get(p, {}).items():
            opt_tensors[f"{name}::{key}"] = full_tensor(torch.as_tensor(value))
    return model_tensors, opt_tensors


def write_checkpoint(
    ckpt_dir: Path, model_tensors: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    """Write gathered tensors, the RNG and ``state`` (JSON-serialisable) into ckpt_dir."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(model_tensors, ckpt_dir / MODEL_FILE)
    save_tensors(opt_tensors, ckpt_dir / OPTIMIZER_FILE)
    save_tensors({"torch_cpu": torch.get_rng_state()}, ckpt_dir / RNG_FILE)
    (ckpt_dir / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def save_checkpoint(
    ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Write model, optimizer and RNG tensors plus ``state`` (JSON-serialisable) into ckpt_dir."""
    write_checkpoint(ckpt_dir, *gather_checkpoint(model, optimizer), state)


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    """train_state.json of a checkpoint."""
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {ckpt_dir} is not a training checkpoint")
    return json.loads(path.read_text())


def load_model_weights(ckpt_dir: Path, model: nn.Module) -> None:
    """Copy the checkpoint's weights into ``model`` (before DDP wrapping)."""
    load_into_model(model, load_file(str(ckpt_dir / MODEL_FILE)), ckpt_dir)


def load_optimizer_state(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore AdamW moments and step counts onto the parameters' devices."""
    tensors = load_file(str(ckpt_dir / OPTIMIZER_FILE))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, p in zip(_param_names(model, optimizer), params):
        entries = {k.split("::", 1)[1]: t for k, t in tensors.items() if k.startswith(f"{name}::")}
        if not entries:
            continue  # this parameter had not been stepped yet
        state = {}
        for key, t in entries.items():
            # AdamW keeps 'step' as a CPU scalar tensor unless capturable; moments live with the param.
            if key == "step":
                state[key] = t
            elif isinstance(p, DTensor):  # FSDP: keep this worker's shard, laid out like the param
                state[key] = distribute_tensor(t.to(p.device, dtype=p.dtype), p.device_mesh, p.placements)
            else:
                state[key] = t.to(p.device, dtype=p.dtype)
        optimizer.state[p] = state
    torch.set_rng_state(load_file(str(ckpt_dir / RNG_FILE))["torch_cpu"])
