"""`fastserve-ray compress`: validate the recipe against the model, then run the Ray task graph."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastserve_ray.compress.pipeline import CompressOptions, validate_inputs
from fastserve_ray.compress.recipe import load_recipe


def run_compress_command(args: argparse.Namespace) -> int:
    """Compress args.model with args.recipe into args.out (optionally calibrating on args.data)."""
    recipe = load_recipe(args.recipe)
    data = Path(args.data) if args.data else None
    # Every user mistake surfaces here, before Ray starts or any task runs.
    validate_inputs(Path(args.model), Path(args.out), recipe, data, args.overwrite)

    from fastserve_ray.cluster import ensure_ray
    from fastserve_ray.compress.graph import run_graph

    ensure_ray()
    result = run_graph(args.model, args.out, recipe, data, CompressOptions(overwrite=args.overwrite))
    print(f"compressed {args.model} -> {result.out_dir} (report: {result.out_dir / 'report.json'})")
    return 0
