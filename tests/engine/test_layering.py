"""Module structure the engine relies on: no policy imports another, one top-k/top-p rule."""

import ast
from pathlib import Path

import torch

from fastserve_ray.engine import sampler
from fastserve_ray.models import generate


def _imports(module) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_scheduler_imports_no_policy_module():
    from fastserve_ray.engine import engine_config, mlfq, scheduler, scheduler_output

    assert "fastserve_ray.engine.mlfq" not in _imports(scheduler)  # the old cycle
    assert not any("scheduler" in m for m in _imports(engine_config))
    assert _imports(scheduler_output) == {"__future__"}
    assert "fastserve_ray.engine.scheduler_output" in _imports(mlfq)


def test_generate_and_the_sampler_share_the_top_p_rule():
    assert sampler.apply_top_k_top_p is generate.apply_top_k_top_p
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    # The nucleus of 0.75 is {0, 1}: the single-prompt path never leaves it either.
    draws = {generate.sample_next(logits, 1.0, top_p=0.75, generator=g) for _ in range(200)}
    assert draws == {0, 1}


# Which packages each package may import (its own included); anything else is a layering break.
ALLOWED = {
    "kernels": {"kernels", "capability", "envs", "errors"},
    "layers": {"layers", "kernels", "capability", "envs", "errors", "models.cache"},
    "quantized": {"quantized", "layers", "kernels", "models", "capability", "envs", "errors", "config",
                  "atomic", "tokenizer", "device"},
    "structured": {"structured", "errors", "tokenizer"},
    "engine": {"engine", "quantized", "layers", "kernels", "models", "capability", "envs", "errors",
               "config", "device", "perf", "tokenizer", "structured"},
}


def _package_imports(package: str) -> dict[str, set[str]]:
    """Per file of ``fastserve_ray/<package>``, the fastserve_ray modules it imports (anywhere)."""
    root = Path(__file__).resolve().parents[2] / "fastserve_ray" / package
    found = {}
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found[path.name] = {m.removeprefix("fastserve_ray.") for m in mods if m.startswith("fastserve_ray.")}
    return found


def _allowed(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def test_layers_call_only_downward():
    breaks = [f"{package}/{name} imports fastserve_ray.{module}"
              for package, allowed in ALLOWED.items()
              for name, modules in _package_imports(package).items()
              for module in sorted(modules) if not _allowed(module, allowed)]
    assert breaks == []


def test_models_do_not_import_the_engine_the_quantized_runtime_or_compress():
    for name, modules in _package_imports("models").items():
        assert not any(m.split(".")[0] in ("engine", "quantized", "compress", "serve") for m in modules), name
