"""`fastserve-ray compress`: validate the recipe against the model, then run the Ray task graph."""

from __future__ import annotations

import argparse

from fastserve_ray import storage
from fastserve_ray.compress.pipeline import CompressOptions, absolute_location, validate_inputs
from fastserve_ray.compress.recipe import load_recipe


def run_compress_command(args: argparse.Namespace) -> int:
    """Compress args.model with args.recipe into args.out (optionally calibrating on args.data)."""
    recipe = load_recipe(args.recipe)
    data = absolute_location(args.data) if args.data else None
    model, out = absolute_location(args.model), absolute_location(args.out)
    # Every user mistake surfaces here, before Ray starts or any task runs.
    validate_inputs(model, out, recipe, data, args.overwrite)

    from fastserve_ray.cluster import ensure_ray
    from fastserve_ray.compress.graph import run_graph

    ensure_ray()
    result = run_graph(model, out, recipe, data, CompressOptions(overwrite=args.overwrite))
    report = storage.join(result.out_dir, "report.json")
    print(f"compressed {args.model} -> {result.out_dir} (report: {report})")
    return 0
