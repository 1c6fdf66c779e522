"""The demo's compression step: the task graph on the model the demo trained, sizes and perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastserve_ray.cluster import ensure_ray
from fastserve_ray.compress.graph import run_graph
from fastserve_ray.compress.pipeline import CompressOptions
from fastserve_ray.compress.recipe import load_recipe


def compress_for_demo(model_dir: Path, data_dir: Path, out_dir: Path, recipe: str = "int8") -> dict[str, Any]:
    """Compress ``model_dir`` with ``recipe`` into ``out_dir``; print and return size and perplexity."""
    ensure_ray()
    result = run_graph(model_dir, out_dir, load_recipe(recipe), data_dir, CompressOptions(overwrite=True))
    r = result.report
    summary = {
        "recipe": recipe,
        "out_dir": str(result.out_dir),
        "linear_weight_ratio": r["linear_weight_ratio"],
        "artifact_bytes": r["artifact_bytes"],
        "model_fp32_bytes": r["model_fp32_bytes"],
        "artifact_ratio": r["artifact_ratio"],
        "perplexity_before": r["eval"]["before"]["perplexity"],
        "perplexity_after": r["eval"]["after"]["perplexity"],
        "wall_s": r["wall_s"],
    }
    s = summary
    print(f"   {recipe}: {s['model_fp32_bytes'] / 1e6:.2f} MB fp32 -> {s['artifact_bytes'] / 1e6:.2f} MB "
          f"on disk "
          f"({s['artifact_ratio']:.2f}x; linear weights {s['linear_weight_ratio']:.2f}x); "
          f"perplexity {s['perplexity_before']:.2f} -> {s['perplexity_after']:.2f}", flush=True)
    return summary
