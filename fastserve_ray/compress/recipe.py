"""Compression recipes: YAML in llm-compressor's vocabulary, validated before any work starts.

    sparsity_stage:
      sparsity_modifiers:
        WandaPruningModifier: {sparsity: 0.5, mask_structure: "2:4", targets: [Linear], ignore: [lm_head]}
    quant_stage:
      quant_modifiers:
        GPTQModifier:
          targets: [Linear]
          ignore: [lm_head]
          scheme: W4A16                 # or config_groups: {group_0: {targets, weights: {...}}}
          block_size: 128
          dampening_frac: 0.01

Modifiers: QuantizationModifier (round-to-nearest), GPTQModifier, MagnitudePruningModifier
(``scope: layer | global``) and WandaPruningModifier. Targets/ignore entries are module class
names ("Linear", "LSTM", ...), exact module names ("lm_head") or regexes ("re:.*mlp.*"). The output
head and embeddings stay in float unless a target names the head explicitly. Every error names the
recipe file, the key and the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from fastserve_ray.config import ModelConfig
from fastserve_ray.errors import ConfigError
from fastserve_ray.models.factory import build_model
from fastserve_ray.quantized.qtensor import SUPPORTED_BITS

RECIPES_DIR = Path(__file__).resolve().parents[2] / "deployments" / "recipes"

# llm-compressor's preset schemes (weight-only, symmetric int; A16 = activations stay float).
SCHEMES = {"W8A16": (8, None), "W4A16": (4, 128), "W3A16": (3, 128)}
_COMMON = {"targets", "ignore"}
MODIFIER_KEYS = {
    "QuantizationModifier": _COMMON | {"scheme", "config_groups"},
    "GPTQModifier": _COMMON | {"scheme", "config_groups", "block_size", "dampening_frac", "actorder"},
    "MagnitudePruningModifier": _COMMON | {"sparsity", "mask_structure", "scope"},
    "WandaPruningModifier": _COMMON | {"sparsity", "mask_structure"},
}
WEIGHT_KEYS = {"num_bits", "type", "symmetric", "strategy", "group_size"}
_RNN_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


@dataclass(frozen=True)
class PruneSpec:
    """One pruning modifier: method "magnitude" | "wanda", sparsity, "unstructured" or "N:M"."""

    method: str
    sparsity: float
    structure: str
    scope: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    where: str  # "file: key path", for errors found later


@dataclass(frozen=True)
class QuantSpec:
    """One quantization config: method "rtn" | "gptq", bits, group_size (None = per channel)."""

    method: str
    bits: int
    group_size: int | None
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    where: str
    block_size: int = 128
    dampening_frac: float = 0.01


@dataclass
class Recipe:
    """A parsed recipe: its name, file, raw dict (recorded in the artifact) and modifiers in order."""

    name: str
    path: str
    raw: dict[str, Any]
    modifiers: list[PruneSpec | QuantSpec] = field(default_factory=list)

    @property
    def needs_calibration(self) -> bool:
        """True when a modifier uses activation statistics (Wanda, GPTQ)."""
        return any(m.method in ("wanda", "gptq") for m in self.modifiers)

    @property
    def is_sequential(self) -> bool:
        """Calibrate each block on the outputs of the already-compressed blocks before it.

        GPTQ's error compensation and Wanda's input norms both assume the inputs the layer will
        see in the compressed model (the papers' reference code runs block by block, too).
        """
        return self.needs_calibration


@dataclass
class LayerPlan:
    """What happens to one weight: an optional pruning, then an optional quantization."""

    name: str
    shape: tuple[int, int]
    block: int | None  # decoder block index (None outside blocks, e.g. the head or an RNN)
    prune: PruneSpec | None = None
    quant: QuantSpec | None = None

    @property
    def sparsity_layout(self) -> str:
        """How the codec stores its zeros: "2:4", "unstructured" or "none"."""
        if self.prune is None:
            return "none"
        return "2:4" if self.prune.structure == "2:4" else "unstructured"


def shipped_recipes() -> list[str]:
    """Names of the recipes under deployments/recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A shipped recipe's file for a bare name (``int8``), else the given YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown recipe {str(name_or_path)!r}: not a file, and not a shipped recipe "
                          f"({', '.join(shipped_recipes())})")
    return shipped


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Parse and validate a recipe (by shipped name or path); ConfigError names file, key and value."""
    path = resolve_recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_recipe(raw, str(path), name=path.stem)


def _err(where: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={value!r}: {why}")


def parse_recipe(raw: Any, where: str, name: str = "recipe") -> Recipe:
    """Validate a recipe dict (stages -> modifier groups -> modifiers) into a Recipe."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: a recipe is a mapping of stages (e.g. quant_stage), got {raw!r}")
    recipe = Recipe(name, where, raw)
    for stage, groups in raw.items():
        if not str(stage).endswith("_stage") or not isinstance(groups, dict):
            raise _err(where, str(stage), groups, "top-level keys are stages named '<name>_stage' "
                       "holding '<name>_modifiers' mappings")
        for group, modifiers in groups.items():
            key = f"{stage}.{group}"
            if not str(group).endswith("_modifiers") or not isinstance(modifiers, dict):
                raise _err(where, key, modifiers, "a stage holds '<name>_modifiers' mappings of modifiers")
            for mod_name, args in modifiers.items():
                recipe.modifiers.extend(_parse_modifier(str(mod_name), args, where, f"{key}.{mod_name}"))
    if not recipe.modifiers:
        raise ConfigError(f"{where}: the recipe has no modifiers")
    return recipe


def _str_list(value: Any, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(where, key, value, "expected a list of module names, class names or 're:' patterns")
    return tuple(value)


def _parse_modifier(mod: str, args: Any, where: str, key: str) -> list[PruneSpec | QuantSpec]:
    if mod not in MODIFIER_KEYS:
        raise _err(where, key.rsplit(".", 1)[0], mod,
                   f"unknown modifier; choose from {sorted(MODIFIER_KEYS)}")
    args = args or {}
    if not isinstance(args, dict):
        raise _err(where, key, args, "a modifier's arguments are a mapping")
    for k in args:
        if k not in MODIFIER_KEYS[mod]:
            raise _err(where, f"{key}.{k}", args[k],
                       f"unknown key for {mod}; allowed: {sorted(MODIFIER_KEYS[mod])}")
    targets = _str_list(args.get("targets", ["Linear"]), where, f"{key}.targets")
    ignore = _str_list(args.get("ignore", []), where, f"{key}.ignore")
    if mod.endswith("PruningModifier"):
        sparsity = args.get("sparsity")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise _err(where, f"{key}.sparsity", sparsity, "sparsity must be a number in [0, 1)")
        structure = str(args.get("mask_structure", "unstructured"))
        if structure != "unstructured":
            m = re.fullmatch(r"(\d+):(\d+)", structure)
            if not m or not 0 < int(m[1]) < int(m[2]):
                raise _err(where, f"{key}.mask_structure", structure,
                           "use 'unstructured' or 'N:M' with 0 < N < M")
        scope = args.get("scope", "layer")
        if scope not in ("layer", "global"):
            raise _err(where, f"{key}.scope", scope, "use 'layer' or 'global'")
        if scope == "global" and structure != "unstructured":
            raise _err(where, f"{key}.scope", scope, "global pruning is unstructured only")
        method = "wanda" if mod == "WandaPruningModifier" else "magnitude"
        return [PruneSpec(method, float(sparsity), structure, scope, targets, ignore, f"{where}: {key}")]

    method = "gptq" if mod == "GPTQModifier" else "rtn"
    extra: dict[str, Any] = {}
    if method == "gptq":
        block_size = args.get("block_size", 128)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise _err(where, f"{key}.block_size", block_size, "a positive integer")
        damp = args.get("dampening_frac", 0.01)
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise _err(where, f"{key}.dampening_frac", damp, "a number in (0, 1)")
        if args.get("actorder") not in (None, False):
            raise _err(where, f"{key}.actorder", args["actorder"], "activation ordering is not supported")
        extra = {"block_size": block_size, "dampening_frac": float(damp)}
    if ("scheme" in args) == ("config_groups" in args):
        raise _err(where, key, args, "give exactly one of 'scheme' or 'config_groups'")
    if "scheme" in args:
        if args["scheme"] not in SCHEMES:
            raise _err(where, f"{key}.scheme", args["scheme"], f"choose from {sorted(SCHEMES)}")
        bits, group = SCHEMES[args["scheme"]]
        return [QuantSpec(method, bits, group, targets, ignore, f"{where}: {key}.scheme", **extra)]
    groups = args["config_groups"]
    if not isinstance(groups, dict) or not groups:
        raise _err(where, f"{key}.config_groups", groups, "a mapping of group names to {targets, weights}")
    specs: list[PruneSpec | QuantSpec] = []
    for gname, group in groups.items():
        gkey = f"{key}.config_groups.{gname}"
        if not isinstance(group, dict) or set(group) - {"targets", "weights"} or "weights" not in group:
            raise _err(where, gkey, group, "a config group holds 'weights' (and optionally 'targets')")
        gtargets = _str_list(group.get("targets", list(targets)), where, f"{gkey}.targets")
        bits, group_size = _parse_weights(group["weights"], where, f"{gkey}.weights")
        specs.append(QuantSpec(method, bits, group_size, gtargets, ignore, f"{where}: {gkey}.weights",
                               **extra))
    return specs


def _parse_weights(w: Any, where: str, key: str) -> tuple[int, int | None]:
    if not isinstance(w, dict):
        raise _err(where, key, w, "a mapping with num_bits, type, symmetric, strategy, group_size")
    for k in w:
        if k not in WEIGHT_KEYS:
            raise _err(where, f"{key}.{k}", w[k], f"unknown key; allowed: {sorted(WEIGHT_KEYS)}")
    bits = w.get("num_bits")
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise _err(where, f"{key}.num_bits", bits, f"bits must be one of {list(SUPPORTED_BITS)}")
    if w.get("type", "int") != "int":
        raise _err(where, f"{key}.type", w["type"], "only 'int' weights are supported")
    if w.get("symmetric", True) is not True:
        raise _err(where, f"{key}.symmetric", w["symmetric"], "only symmetric quantization is supported")
    strategy = w.get("strategy", "group" if "group_size" in w else "channel")
    if strategy == "channel":
        if w.get("group_size") is not None:
            raise _err(where, f"{key}.group_size", w["group_size"], "strategy 'channel' takes no group_size")
        return bits, None
    if strategy != "group":
        raise _err(where, f"{key}.strategy", strategy, "use 'channel' or 'group'")
    g = w.get("group_size")
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise _err(where, f"{key}.group_size", g, "strategy 'group' needs a positive integer group_size")
    return bits, g


# -- matching against a model ---------------------------------------------------------------------


def _weights_of(module_name: str, module: nn.Module) -> list[str]:
    if isinstance(module, nn.Linear):
        return [f"{module_name}.weight"]
    if isinstance(module, _RNN_TYPES):
        return [f"{module_name}.{n}" for n, p in module.named_parameters(recurse=False)
                if n.startswith("weight_") and p.dim() == 2]
    return []


def _matches(token: str, module_name: str, module: nn.Module) -> bool:
    if token.startswith("re:"):
        return re.match(token[3:], module_name) is not None
    return token == module_name or token == type(module).__name__


def plan_layers(recipe: Recipe, config: ModelConfig) -> dict[str, LayerPlan]:
    """Which weights each modifier touches, checked against the model before any work."""
    with torch.device("meta"):
        model = build_model(config)
    modules = [(n, m) for n, m in model.named_modules() if _weights_of(n, m)]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    plans: dict[str, LayerPlan] = {}
    for spec in recipe.modifiers:
        matched = []
        for mname, module in modules:
            explicit = any(t == mname or (t.startswith("re:") and _matches(t, mname, module))
                           for t in spec.targets)
            if not any(_matches(t, mname, module) for t in spec.targets):
                continue
            if any(_matches(t, mname, module) for t in spec.ignore):
                continue
            if mname == "lm_head" and not explicit:
                continue  # the output head stays in float unless named
            if mname == "lm_head" and config.tie_embeddings:
                raise ConfigError(f"{spec.where}: targets={list(spec.targets)}: lm_head is tied to the "
                                  "embedding in this model and cannot be compressed; add it to ignore")
            matched.extend(_weights_of(mname, module))
        if not matched:
            raise ConfigError(f"{spec.where}: targets={list(spec.targets)} ignore={list(spec.ignore)} "
                              f"match no weight of this {config.arch} model")
        for name in matched:
            shape = shapes[name]
            block = int(name.split(".")[1]) if name.startswith("layers.") else None
            plan = plans.setdefault(name, LayerPlan(name, shape, block))  # type: ignore[arg-type]
            _check_fits(spec, plan, config)
            if isinstance(spec, PruneSpec):
                if plan.prune is not None or plan.quant is not None:
                    raise ConfigError(f"{spec.where}: {name} is already "
                                      f"{'pruned' if plan.prune else 'quantized'} by an earlier modifier "
                                      "(prune at most once, and before quantizing)")
                plan.prune = spec
            else:
                if plan.quant is not None:
                    raise ConfigError(f"{spec.where}: {name} is already quantized by {plan.quant.where}")
                plan.quant = spec
    return {name: plans[name] for name in shapes if name in plans}  # model order


def _check_fits(spec: PruneSpec | QuantSpec, plan: LayerPlan, config: ModelConfig) -> None:
    k = plan.shape[1]
    if spec.method in ("wanda", "gptq") and config.is_recurrent:
        raise ConfigError(f"{spec.where}: {spec.method} needs per-layer activations of a decoder "
                          f"(llama) model; this model is {config.arch} (use magnitude pruning or "
                          "QuantizationModifier)")
    if spec.method in ("wanda", "gptq") and plan.block is None:
        raise ConfigError(f"{spec.where}: {spec.method} calibrates decoder-block layers only; "
                          f"add {plan.name.rsplit('.', 1)[0]} to ignore or use a data-free modifier")
    if isinstance(spec, QuantSpec) and spec.group_size is not None and k % spec.group_size:
        raise ConfigError(f"{spec.where}.group_size={spec.group_size}: does not divide the input width "
                          f"{k} of {plan.name}")
    if isinstance(spec, PruneSpec) and spec.structure != "unstructured":
        m = int(spec.structure.split(":")[1])
        if k % m:
            raise ConfigError(f"{spec.where}.mask_structure={spec.structure!r}: {plan.name} has input width "
                              f"{k}, not divisible by {m}")
