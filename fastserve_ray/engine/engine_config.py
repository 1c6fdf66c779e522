"""Engine knobs in one validated dataclass, buildable from YAML/JSON (unknown keys rejected).

Sizes left as None are derived from the model and the device when the engine starts (see
``resolve_cache_sizes``), so the same config serves a laptop and a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from fastserve_ray.config import config_from_dict
from fastserve_ray.envs import ATTENTION_BACKENDS, LINEAR_BACKENDS
from fastserve_ray.errors import ConfigError

# When no KV budget is given: the share of free GPU memory the cache may take (weights are
# already loaded; the rest is left for activations), and a fixed cap on CPU and for the host
# swap tier, where "free memory" is shared with everything else on the machine.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.8
DEFAULT_CPU_KV_BUDGET_BYTES = 1 << 30
DEFAULT_HOST_SWAP_BUDGET_BYTES = 4 << 30
DTYPE_NAMES = ("auto", "float32", "bfloat16")
PREEMPTION_MODES = ("recompute", "swap")
SCHEDULER_POLICIES = ("fcfs", "mlfq")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, schedules and sizes its caches; None means derive a default."""

    policy: str = "fcfs"  # "fcfs" or "mlfq" (FastServe's skip-join MLFQ)
    block_size: int = 16  # tokens per KV block (ignored by recurrent models)
    num_blocks: int | None = None  # device KV blocks (recurrent: state slots)
    kv_cache_memory_bytes: int | None = None  # device KV budget when num_blocks is None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    num_host_blocks: int | None = None  # host swap tier; None: as many as the device when swapping
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_seq_len
    preemption_mode: str | None = None  # None: the policy's default (fcfs recompute, mlfq swap)
    swap_watermark: float | None = None  # None: the policy's default
    enable_prefix_caching: bool = True
    num_queues: int = 8  # MLFQ only, like the three below
    base_quantum: float | None = None
    starvation_threshold: float | None = None
    prefill_time: dict[int, float] | None = None  # None: profiled at start-up
    seed: int | None = None  # seeds the generators of requests that bring no seed
    # Weights, activations and KV cache: "auto" is bf16 on CUDA and on CPUs with native bf16
    # (AVX-512 BF16 / AMX), else fp32; RoPE frequencies and sampling stay fp32 either way.
    # An engine built on an already-built model keeps the model's dtype under "auto".
    dtype: str = "auto"
    # torch.compile the decode-only steps of Llama models (batch padded to power-of-two
    # buckets, each compiled at start-up; prefill and mixed steps stay eager). Off by default:
    # measured in fp32 on a 2-vCPU AVX2 machine, compiling takes 3-10 minutes of start-up and
    # the step is ~12% faster at batch 1 but slower from batch 8 up (docs/engine.md).
    compile: bool = False
    # Backends, resolved with what the machine can run into the engine plan (engine/plan.py),
    # logged once at start-up and reported in load_snapshot()["plan"]. "auto" picks the fastest
    # this machine supports; naming one the machine cannot run is a ConfigError saying why.
    attention_backend: str = "auto"  # "auto", "paged" (per sequence; native decode on CPU), "flex"
    linear_backend: str = "auto"  # "auto", "plain" (F.linear), "onednn-packed" (CPU)
    native_kernels: bool = True  # false: the PyTorch paths only, even where the kernels are built

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field and value for anything impossible."""
        if self.policy not in SCHEDULER_POLICIES:
            raise ConfigError(f"engine.policy must be one of {SCHEDULER_POLICIES}, got {self.policy!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"engine.compile must be true or false, got {self.compile!r}")
        if not isinstance(self.native_kernels, bool):
            raise ConfigError(f"engine.native_kernels must be true or false, got {self.native_kernels!r}")
        for name, allowed in (("attention_backend", ATTENTION_BACKENDS),
                              ("linear_backend", LINEAR_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"engine.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"engine.dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.preemption_mode is not None and self.preemption_mode not in PREEMPTION_MODES:
            raise ConfigError(
                f"engine.preemption_mode must be one of {PREEMPTION_MODES} or null, "
                f"got {self.preemption_mode!r}"
            )
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_queues"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("num_blocks", "max_model_len", "kv_cache_memory_bytes"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.num_host_blocks is not None:
            _check_int("num_host_blocks", self.num_host_blocks, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ConfigError(f"engine.gpu_memory_utilization must be in (0, 1], got {u!r}")
        for name in ("base_quantum", "starvation_threshold"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise ConfigError(f"engine.{name} must be a finite number > 0 or null, got {v!r}")

    def replace(self, **overrides: Any) -> EngineConfig:
        """A copy with ``overrides`` applied and validated."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "engine") -> EngineConfig:
        """Build from a plain mapping (YAML/JSON); unknown keys and wrong types are ConfigErrors."""
        return config_from_dict(cls, data, where)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"engine.{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CacheSizes:
    """Resolved pool sizes: device and host blocks (recurrent models: state slots)."""

    num_blocks: int
    num_host_blocks: int


def default_preemption_mode(policy: str) -> str:
    """The policy's own preemption mode: mlfq swaps demoted KV to the host tier, fcfs (like
    vLLM) recomputes."""
    return "swap" if policy == "mlfq" else "recompute"


def resolve_cache_sizes(
    config: EngineConfig,
    *,
    bytes_per_block: int,
    is_recurrent: bool,
    max_model_len: int,
    preemption_mode: str,
    device: torch.device,
) -> CacheSizes:
    """Device and host pool sizes from the config, the model's block size in bytes and the device."""
    if is_recurrent:
        # A state slot per sequence; twice max_num_seqs lets idle (token-level preempted)
        # sequences keep their state while a full batch runs, at a few KiB per slot.
        wanted = 2 * config.max_num_seqs
    else:
        # No point in more than a full batch of full-length sequences.
        wanted = config.max_num_seqs * math.ceil(max_model_len / config.block_size)
    if config.num_blocks is not None:
        num_blocks = config.num_blocks
    else:
        budget = config.kv_cache_memory_bytes
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * config.gpu_memory_utilization)
            else:
                budget = DEFAULT_CPU_KV_BUDGET_BYTES
        if budget < bytes_per_block:
            raise ConfigError(
                f"engine.kv_cache_memory_bytes={budget} holds no block of {bytes_per_block} bytes; "
                "raise the budget or lower block_size"
            )
        num_blocks = min(wanted, budget // bytes_per_block)
    if config.num_host_blocks is not None:
        num_host_blocks = config.num_host_blocks
    elif preemption_mode == "swap":
        # Room for more than the device holds: sequences swapped out accumulate while the device
        # fills again, and once the tier is full a demoted sequence's KV is dropped and all of
        # it recomputed (in the scheduling simulator on the bench's kv-bound trace, a tier the
        # device's size dropped ~4 sequences per run, and in overload mlfq fell behind fcfs).
        # Capped by the swap budget and by a full batch of full-length sequences.
        num_host_blocks = min(
            max(num_blocks, wanted), max(1, DEFAULT_HOST_SWAP_BUDGET_BYTES // bytes_per_block)
        )
    else:
        num_host_blocks = 0
    return CacheSizes(num_blocks, num_host_blocks)
