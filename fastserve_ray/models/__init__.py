"""Model definitions, presets, model-directory I/O and HF interop. Knows nothing about Ray."""

from fastserve_ray.models.cache import CacheContext, build_cache_context
from fastserve_ray.models.factory import build_empty_model, build_model, num_params
from fastserve_ray.models.llama import LlamaModel
from fastserve_ray.models.model_dir import LoadedModel, load_model_dir, read_manifest, save_model_dir
from fastserve_ray.models.presets import PRESETS, get_preset, parse_preset_spec
from fastserve_ray.models.recurrent import RecurrentLM

__all__ = [
    "PRESETS",
    "CacheContext",
    "LlamaModel",
    "LoadedModel",
    "RecurrentLM",
    "build_cache_context",
    "build_empty_model",
    "build_model",
    "get_preset",
    "load_model_dir",
    "num_params",
    "parse_preset_spec",
    "read_manifest",
    "save_model_dir",
]
