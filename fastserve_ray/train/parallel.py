"""Data-parallel strategies: DDP (replicated weights) or FSDP2 (sharded weights, grads, optimizer state).

``ddp`` goes through Ray Train's ``prepare_model`` (DistributedDataParallel when
world > 1). ``fsdp`` applies PyTorch's FSDP2 ``fully_shard`` to every decoder
layer and then the root module, over a 1-D device mesh of all workers: each
worker keeps 1/world of every parameter, its gradient and its AdamW moments,
and all-gathers a layer's weights just for that layer's forward/backward.
Both average gradients over workers, so the optimisation is the same.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embedding, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in getattr(model, "layers", []):  # recurrent models have none: the root holds all
        # One FSDP unit per decoder layer. The model calls the layer's children directly (not
        # layer.forward), so the unit is the group of its children: FSDP2 unshards the group
        # before the first of them runs and reshards after the last.
        fully_shard(list(layer.children()), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap_model(model: nn.Module, strategy: str, session, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(module to call, module holding the parameters) for ``strategy``."""
    if strategy == "fsdp" and dist.is_available() and dist.is_initialized():
        sharded = shard_model(model, device)
        return sharded, sharded
    wrapped = session.prepare_model(model)  # moves to device; DDP when world > 1
    raw = wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped
    return wrapped, raw


def grad_sync(model: nn.Module, raw: nn.Module, is_last_micro_step: bool) -> AbstractContextManager:
    """Reduce gradients on the last micro-step only (DDP ``no_sync``; FSDP2 requires_gradient_sync)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext() if is_last_micro_step else model.no_sync()
    if hasattr(raw, "set_requires_gradient_sync"):  # an FSDP2 module
        raw.set_requires_gradient_sync(is_last_micro_step)
    return nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU: all-gathered from the workers' shards for a DTensor (a collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
