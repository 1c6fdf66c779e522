"""Typed configs: dataclasses validated where built, unknown keys rejected.

Every config here can be built from a plain dict (JSON/YAML) through
``config_from_dict``, which names the unknown or mistyped key in its error.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fastserve_ray.errors import ConfigError

T = TypeVar("T")

ARCHS = ("llama", "rnn", "lstm", "gru")
RECURRENT_ARCHS = ("rnn", "lstm", "gru")


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently coerce int->float) one value against its field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _check_type(value, non_none[0], where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def config_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys are {', '.join(sorted(fields))}"
        )
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with an error naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a language model: a Llama-style decoder or a recurrent LM."""

    arch: str = "llama"
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    ffn_dim: int | None = None  # None: SwiGLU's 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2-style bias on the q/k/v projections
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", _round_up(int(8 * self.dim / 3), 64))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the values for any impossible shape."""
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch: unknown architecture {self.arch!r}; choose one of {ARCHS}")
        for name in ("vocab_size", "dim", "n_layers", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")
        if self.arch != "llama":
            return
        if self.n_heads < 1 or self.n_kv_heads < 1:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) and n_kv_heads ({self.n_kv_heads}) must be >= 1"
            )
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} does not divide model.dim={self.dim}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.dim/n_heads = {self.dim}/{self.n_heads} = {self.head_dim} must be even for RoPE"
            )
        if self.ffn_dim < 1:
            raise ConfigError(f"model.ffn_dim must be >= 1, got {self.ffn_dim}")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_recurrent(self) -> bool:
        return self.arch in RECURRENT_ARCHS

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with ``overrides`` applied and validated (unknown keys rejected)."""
        return config_from_dict(ModelConfig, {**self.to_dict(), **overrides}, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model") -> ModelConfig:
        return config_from_dict(cls, data, where)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. The global batch is fixed here; workers x micro-batches are derived."""

    preset: str = "small"  # model preset spec "NAME[,key=value...]"
    model: dict = dataclasses.field(default_factory=dict)  # overrides on top of the preset
    num_workers: int = 2  # the maximum when min_workers is set (elastic)
    min_workers: int | None = None  # set for an elastic (min_workers, num_workers) range
    use_gpu: str = "auto"  # "auto" | "true" | "false"
    strategy: str = "ddp"  # "ddp": replicated weights; "fsdp": FSDP2, weights/grads/optimizer sharded
    global_batch_size: int = 32  # sequences per optimizer step, whatever the worker count
    micro_batch_size: int = 8  # sequences per forward/backward on one worker
    max_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_rows: int = 128  # validation rows per evaluation (0: skip validation)
    log_interval: int = 10
    checkpoint_interval: int = 50
    num_checkpoints_to_keep: int = 2
    max_failures: int = 3
    seed: int = 0
    compile: bool = False
    threads_per_worker: int = 0  # 0: the node's CPUs shared evenly among workers
    run_name: str = "train"
    storage_path: str = ""  # "": RUN_DIR/checkpoints
    fail_at_step: int = -1  # fault injection for tests: the last worker dies once at this step
    peak_flops: float = 0.0  # per-device FLOP/s that MFU divides by; 0: probe once before training
    elastic_resize_interval_s: float = 60.0  # elastic runs: how often to look for room to grow
    # use_gpu "true" on a cluster with fewer GPUs than workers: how long to wait for an autoscaler
    # to add them (a GPU worker group that scales from zero) before failing.
    worker_wait_s: float = 600.0
    step_delay_s: float = 0.0  # test hook: sleep after every step (paces elasticity tests) ...
    step_delay_file: str = ""  # ... only while this file exists, when set

    def __post_init__(self) -> None:
        positive = ("num_workers", "global_batch_size", "micro_batch_size", "max_steps",
                    "log_interval", "eval_interval", "checkpoint_interval", "num_checkpoints_to_keep")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_failures", "eval_rows", "threads_per_worker", "peak_flops",
                     "elastic_resize_interval_s", "step_delay_s", "worker_wait_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"train.min_workers={self.min_workers} must be in [1, num_workers={self.num_workers}]"
            )
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"train.strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"train.use_gpu must be auto, true or false, got {self.use_gpu!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"train.lr={self.lr} must be > 0 and train.min_lr={self.min_lr} in [0, lr]")
        for n in range(self.min_workers or self.num_workers, self.num_workers + 1):
            if self.global_batch_size % n:
                raise ConfigError(
                    f"train.global_batch_size={self.global_batch_size} must divide evenly among "
                    f"{n} workers (every worker count in the range must divide it)"
                )

    @property
    def worker_range(self) -> tuple[int, int]:
        return (self.min_workers or self.num_workers, self.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "train") -> TrainConfig:
        return config_from_dict(cls, data, where)


def parse_num_workers(spec: str) -> tuple[int, int | None]:
    """"N" -> (N, None); "MIN:MAX" -> (MAX, MIN) as (num_workers, min_workers)."""
    try:
        if ":" in spec:
            lo, hi = spec.split(":", 1)
            return int(hi), int(lo)
        return int(spec), None
    except ValueError:
        raise ConfigError(f"--num-workers must be N or MIN:MAX, got {spec!r}") from None
