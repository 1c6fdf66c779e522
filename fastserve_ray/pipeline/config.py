"""pipeline.yaml: what each stage of the pipeline job does, validated (unknown keys rejected).

Only ``out`` is required; every section has the demo's defaults. Stage options are the
options of the matching command: ``data`` = prepare-data, ``train`` = TrainConfig keys,
``compress`` = recipe names, ``serve`` = one model's serving options (see serve/config.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fastserve_ray.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataStage(_Strict):
    """prepare-data: the built-in corpus unless ``inputs`` are given."""

    inputs: list[str] = Field(default_factory=list)
    vocab_size: int = Field(4096, ge=260)
    seq_len: int = Field(256, ge=1)
    text_field: str = "text"


class EvaluateStage(_Strict):
    """Perplexity of the trained and every compressed model on the validation split."""

    max_rows: int = Field(64, ge=1)


class DeployStage(_Strict):
    """Which artifact is served ("trained" or a recipe of ``compress``) and how."""

    enabled: bool = True
    model: str = "trained"
    name: str = "pipeline"
    app_name: str = "fastserve-pipeline"
    route_prefix: str = "/"
    host: str | None = None  # None: 127.0.0.1 locally, 0.0.0.0 when joining a cluster
    port: int = Field(8000, ge=0, le=65535)
    serve: dict[str, Any] = Field(default_factory=dict)  # ModelOptions keys other than path/name


class SmokeStage(_Strict):
    """Requests sent to the deployed model; every one must be answered."""

    prompts: list[str] = Field(default_factory=lambda: ["The for statement", "A function definition"])
    max_tokens: int = Field(16, ge=1)


class PipelineConfig(_Strict):
    """The whole pipeline (see module doc)."""

    out: str
    data: DataStage = Field(default_factory=DataStage)
    train: dict[str, Any] = Field(default_factory=dict)
    compress: list[str] = Field(default_factory=lambda: ["int8"])
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage)
    deploy: DeployStage = Field(default_factory=DeployStage)
    smoke: SmokeStage = Field(default_factory=SmokeStage)

    @field_validator("compress")
    @classmethod
    def _unique_recipes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"recipes must be unique, got {v}")
        return v

    @classmethod
    def from_dict(cls, data: Any, where: str = "pipeline") -> PipelineConfig:
        """Validate a mapping; a ConfigError names the field path and the problem."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        try:
            cfg = cls.model_validate(dict(data))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise ConfigError(f"{where}: {loc}: {err['msg']}, got {err.get('input')!r}") from None
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        """Cross-field checks: train keys, recipes and the deployed model exist."""
        from fastserve_ray.compress.recipe import load_recipe
        from fastserve_ray.config import TrainConfig

        TrainConfig.from_dict(self.train, where=f"{where}: train")
        for recipe in self.compress:
            load_recipe(recipe)  # ConfigError naming an unknown recipe
        if self.deploy.model not in ("trained", *self.compress):
            raise ConfigError(f"{where}: deploy.model: {self.deploy.model!r} is neither 'trained' nor one of "
                              f"the compress recipes {self.compress}")
        if {"path", "name"} & set(self.deploy.serve):
            raise ConfigError(f"{where}: deploy.serve: path and name come from the pipeline, not serve")


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"pipeline config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return PipelineConfig.from_dict(data or {}, where=str(path))
