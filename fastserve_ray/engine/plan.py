"""The engine plan: which backends this engine runs, resolved once from its config and the machine.

``resolve_plan`` turns the config's ``attention_backend`` / ``linear_backend`` / ``native_kernels``
(each may be "auto"), the environment's overrides (envs.py) and the capability object into
concrete choices, before anything is built. Nothing is attempted that the capability rules out,
so a machine without, say, oneDNN bf16 packing gets one plan line at start-up instead of a
warning per layer. Naming a backend the machine cannot run is a ConfigError that says why.

The plan reaches the model through the step's CacheContext (attention backend, native
kernels) and the runner (weight packing); it is logged once and reported in
``LLMEngine.load_snapshot()["plan"]``.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from fastserve_ray.capability import Capability, capability
from fastserve_ray.envs import overrides
from fastserve_ray.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """Concrete backends of one engine (all strings and booleans: JSON-ready)."""

    device: str  # "cpu" | "cuda"
    dtype: str  # "float32" | "bfloat16"
    linear: str  # "onednn-packed" | "plain"
    attention: str  # "paged" (per sequence) | "flex"
    decode_attention: str  # "native-paged" | "per-sequence" | "flex": what a decode step runs
    native_kernels: bool  # norm/RoPE, paged decode (and, with AVX-512 BF16, the few-rows linears)
    few_rows_linear: bool  # native bf16 GEMV for batch-1 decode linears
    one_call_decode: bool  # the one-native-call decoder layer for batch-1 decode
    cpu: str  # the capability line

    def line(self) -> str:
        """The one log line: ``engine plan: device=cpu dtype=float32 linear=...``."""
        parts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if f.name != "cpu"]
        return "engine plan: " + " ".join(parts) + f" ({self.cpu})"

    def as_dict(self) -> dict[str, str | bool]:
        """The plan as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _fmt(v: object) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def _linear(asked: str, device: torch.device, dtype: torch.dtype, compile: bool, cap: Capability) -> str:
    from fastserve_ray.layers.packed_linear import can_pack

    packable = device.type == "cpu" and can_pack(dtype, cap)
    if asked == "onednn-packed":
        if device.type != "cpu":
            raise ConfigError(f"engine.linear_backend='onednn-packed' is for CPUs, not {device.type}")
        if not packable:
            why = cap.lacks("onednn_bf16") if dtype == torch.bfloat16 else "this torch has no oneDNN"
            raise ConfigError(f"engine.linear_backend='onednn-packed' cannot run here: {why}")
        return "onednn-packed"
    if asked == "plain" or compile:  # the compiled decode leaves weights to inductor
        return "plain"
    return "onednn-packed" if packable else "plain"


def _native_kernels_load(cap: Capability) -> bool:
    """Whether the native kernels load: built at install (usable even if the compiler has gone
    since), or buildable now. The module logs a missing compiler or a failed build once."""
    from fastserve_ray.kernels import native

    if cap.compiler is None and not native.built_path().is_file():
        native.native_module()  # its one line: no compiler, the PyTorch paths run
        return False
    return native.native_module() is not None


def resolve_plan(config: object, device: torch.device, dtype: torch.dtype, *, is_recurrent: bool = False,
                 cap: Capability | None = None) -> EnginePlan:
    """The plan for an engine with ``config`` (an EngineConfig) over a model on ``device``/``dtype``."""
    cap = cap or capability()
    env = overrides()
    attention = env.attention_backend or config.attention_backend
    if attention == "auto":
        attention = "paged"
    linear = _linear(env.linear_backend or config.linear_backend, device, dtype, config.compile, cap)
    native = bool(config.native_kernels and device.type == "cpu" and cap.native_kernels_wanted)
    if native:
        native = _native_kernels_load(cap)
    bf16_kernels = native and cap.fast_bf16 and dtype == torch.bfloat16
    if attention == "flex":
        decode_attention = "flex"
    else:
        decode_attention = "native-paged" if native and not is_recurrent else "per-sequence"
    return EnginePlan(
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        linear=linear,
        attention=attention,
        decode_attention=decode_attention if not is_recurrent else "recurrent",
        native_kernels=native,
        few_rows_linear=bf16_kernels and linear == "onednn-packed",
        one_call_decode=bf16_kernels and not is_recurrent and attention != "flex" and not config.compile,
        cpu=cap.describe(),
    )
