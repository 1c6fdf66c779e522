"""The compression pipeline as a dependency graph of task calls, independent of how they run.

    load -> token rows -> [embed -> calibrate block 0 -> calibrate block 1 -> ...] (recipes that
    need activations) -> compress each weight -> encode each weight -> evaluate before / after
    -> write the artifact

An executor turns each ``submit`` into either a Ray task whose arguments are ObjectRefs (graph.py)
or a direct call (serial.py); the same code builds both, so the benchmark compares like with like.
Data-free recipes (round-to-nearest, magnitude) compress all layers in parallel at once; GPTQ and
Wanda calibrate block b on the outputs of the already-compressed blocks before it, so blocks go
one after another while the layers inside a block still run in parallel.

That block-by-block chain (calibrate, propagate, evaluate) is most of the work, so it is split
by rows as well: the calibration and validation rows are cut into as many chunks as the executor
has CPUs (one chunk in one process; Ray tasks are single-threaded, so without chunks the chain
would run on one core of a cluster). Each chunk's Gram matrices are summed in the layer's
compress task and each chunk's loss in a small merge task; chunk edges fall on multiples of the
forward batch, so the batches - and per batch the products - are the same for any chunking.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastserve_ray import storage
from fastserve_ray.compress import tasks
from fastserve_ray.compress.calibration import ROW_BATCH
from fastserve_ray.compress.recipe import LayerPlan, Recipe, plan_layers
from fastserve_ray.data.manifest import MANIFEST_NAME, check_data_fits_model, load_data_manifest
from fastserve_ray.errors import ModelDirError
from fastserve_ray.models.model_dir import MANIFEST_FILE, TOKENIZER_FILE, read_config, read_manifest
from fastserve_ray.models.model_store import check_output_location, local_model_dir
from fastserve_ray.quantized.artifact import (
    COMPRESSED_FILE,
    REPORT_FILE,
    _expected_shapes,
    is_compressed_model_dir,
)
from fastserve_ray.storage import is_uri
from fastserve_ray.tokenizer import Tokenizer


@dataclass
class CompressOptions:
    """Sizes of the calibration/evaluation samples and output handling."""

    num_calibration_rows: int = 64
    num_validation_rows: int = 64
    seq_len: int = 256  # capped by the model's max_seq_len (and the data's rows)
    evaluate: bool = True
    overwrite: bool = False
    fault: tuple[str, str] | None = None  # test hook: (layer name, marker file) kills that task once
    row_chunks: int | None = None  # chunks of calibration/validation rows; None: the executor's CPUs


class Executor(Protocol):
    """Runs task functions; results are values (serial) or ObjectRefs (Ray)."""

    @property
    def parallelism(self) -> int:
        """How many tasks can usefully run at once (1 in one process)."""
        ...

    def submit(self, stage: str, fn: Callable[..., Any], *args: Any, num_returns: int = 1,
               pin_local: bool = False) -> Any: ...

    def get(self, handle: Any) -> Any: ...

    def wait_all(self) -> None: ...


@dataclass
class CompressResult:
    """Where the artifact went and the run's report (sizes, perplexity, timings)."""

    out_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def _as_list(handles: Any, n: int) -> list[Any]:
    return list(handles) if n > 1 else [handles]


def row_chunks(num_rows: int, parts: int, align: int = ROW_BATCH) -> list[tuple[int, int]]:
    """Split ``num_rows`` into at most ``parts`` contiguous (lo, hi) ranges, edges on multiples of ``align``.

    Aligned edges keep every forward batch (ROW_BATCH rows for calibration, the same 8 for
    evaluation) whole, so chunking changes only the order in which batch results are added.
    """
    batches = -(-num_rows // align)
    step = -(-batches // max(1, parts)) * align
    return [(lo, min(lo + step, num_rows)) for lo in range(0, num_rows, step)]


def absolute_location(path: str | Path) -> str:
    """A URI as given, a local path made absolute: task workers need not share this process's cwd."""
    return str(path).rstrip("/") if is_uri(path) else str(Path(path).resolve())


def validate_inputs(model_dir: str, out_dir: str, recipe: Recipe, data_dir: str | None,
                    overwrite: bool) -> dict[str, LayerPlan]:
    """Every check that can fail on user input, before any task starts (locations: absolute_location)."""
    if out_dir == model_dir:
        raise ModelDirError(f"{out_dir}: the output directory must differ from the source model")
    read_manifest(model_dir, verify=True)  # a URI: downloads it into this node's cache, verified
    if is_compressed_model_dir(model_dir):
        raise ModelDirError(f"{model_dir} is already compressed; compress the original model directory")
    config = read_config(model_dir)
    plans = plan_layers(recipe, config)
    check_output_location(out_dir, overwrite)
    if data_dir is not None:
        check_data_fits_model(load_data_manifest(data_dir), config,
                              Tokenizer.load(local_model_dir(model_dir) / TOKENIZER_FILE))
    return plans


def run_pipeline(ex: Executor, model_dir: str | Path, out_dir: str | Path, recipe: Recipe,
                 data_dir: str | Path | None = None,
                 options: CompressOptions | None = None) -> CompressResult:
    """Validate, submit the whole graph to ``ex``, wait for it, and write report.json.

    Any of the three locations may be a URI (``s3://...``): tasks read the model through their
    node's cache and the write task uploads the artifact, so no task is tied to the driver's disk.
    """
    opts = options or CompressOptions()
    model_dir, out_dir = absolute_location(model_dir), absolute_location(out_dir)
    data_dir = None if data_dir is None else absolute_location(data_dir)
    plans = validate_inputs(model_dir, out_dir, recipe, data_dir, opts.overwrite)
    config = read_config(model_dir)
    cfg = config.to_dict()
    names = sorted(_expected_shapes(local_model_dir(model_dir)))
    seq_len = min(opts.seq_len, config.max_seq_len)
    print(f"[compress] {model_dir} -> {out_dir}: recipe {recipe.name!r}, {len(plans)} of {len(names)} "
          f"tensors compressed, "
          f"{'calibrated block by block' if recipe.is_sequential else 'data-free'}", flush=True)
    start = time.perf_counter()

    w = dict(zip(names, _as_list(ex.submit("load", tasks.load_weights, model_dir, names,
                                           num_returns=len(names)), len(names))))
    calib_rows, val_rows, n_calib, n_val = ex.submit(
        "data", tasks.token_rows, model_dir, data_dir,
        opts.num_calibration_rows, opts.num_validation_rows, seq_len, num_returns=4)
    parts = opts.row_chunks or ex.parallelism
    thresholds = {}
    global_specs = {id(p.prune): p.prune for p in plans.values() if p.prune and p.prune.scope == "global"}
    for spec in global_specs.values():
        members = [w[n] for n, p in plans.items() if p.prune is spec]
        thresholds[id(spec)] = ex.submit("threshold", tasks.global_threshold, spec.sparsity, *members)

    def compress(name: str, stats_parts: list[Any]) -> Any:
        plan = plans[name]
        threshold = thresholds.get(id(plan.prune)) if plan.prune else None
        return ex.submit("compress", tasks.compress, w[name], plan, threshold, opts.fault, *stats_parts)

    results: dict[str, Any] = {}
    if recipe.needs_calibration:
        # The one wait on the driver: two ints, to know how to cut the rows (~0.1 s, while the
        # weights load).
        chunks = row_chunks(int(ex.get(n_calib)), parts)
        hidden = [ex.submit("calibrate", tasks.embed, w["embed_tokens.weight"], calib_rows, lo, hi)
                  for lo, hi in chunks]
        for b in range(config.n_layers):
            prefix = f"layers.{b}."
            block_names = sorted(n for n in names if n.startswith(prefix))
            local = [n[len(prefix):] for n in block_names if n in plans]
            outs = [_as_list(ex.submit("calibrate", tasks.calibrate_block, cfg, b, local,
                                       *[w[n] for n in block_names], h, num_returns=len(local) + 1),
                             len(local) + 1) for h in hidden]
            for i, n in enumerate(local):
                results[prefix + n] = compress(prefix + n, [o[i] for o in outs])
            if b == config.n_layers - 1:
                break  # nothing calibrates on the last block's output
            if recipe.is_sequential:
                params = [results.get(n, w[n]) for n in block_names]
                hidden = [ex.submit("propagate", tasks.run_block, cfg, b, *params, h) for h in hidden]
            else:
                hidden = [o[-1] for o in outs]
    for name in plans:
        if name not in results:
            results[name] = compress(name, [])

    encoded, dense = {}, {}
    for n in plans:
        encoded[n], dense[n] = ex.submit("encode", tasks.encode_weight, results[n], plans[n].sparsity_layout,
                                         num_returns=2)
    before = after = None
    if opts.evaluate:
        val_chunks = row_chunks(int(ex.get(n_val)), parts)

        def evaluate(values: list[Any]) -> Any:
            chunk_losses = [ex.submit("evaluate", tasks.evaluate, cfg, val_rows, lo, hi, names, *values)
                            for lo, hi in val_chunks]
            return ex.submit("evaluate", tasks.merge_eval, *chunk_losses)

        before = evaluate([w[n] for n in names])
        after = evaluate([dense.get(n, w[n]) for n in names])
    float_names = [n for n in names if n not in plans]
    enc_names = sorted(plans)
    recipe_record = {"name": recipe.name, "file": recipe.path, "stages": recipe.raw}
    data_record = data_lineage(data_dir, int(ex.get(n_calib)), int(ex.get(n_val)), seq_len,
                               recipe.needs_calibration)
    # A local output is on the driver's node: the write runs there, taking no CPU slot (it is I/O,
    # and a cluster's head often has num-cpus 0). An object-store output can be written anywhere.
    written = ex.submit("write", tasks.write_artifact, out_dir, model_dir, recipe_record,
                        opts.overwrite, float_names, enc_names, before, after, data_record,
                        *[w[n] for n in float_names], *[encoded[n] for n in enc_names],
                        pin_local=not is_uri(out_dir))
    ex.wait_all()
    ex.get(written)
    wall = time.perf_counter() - start
    report = build_report(model_dir, out_dir, plans, wall)
    storage.write_text(storage.join(out_dir, REPORT_FILE), json.dumps(report, indent=2) + "\n")
    _print_summary(report)
    return CompressResult(out_dir if is_uri(out_dir) else Path(out_dir), report)


def data_lineage(data_dir: str | None, num_calibration: int, num_validation: int, seq_len: int,
                 calibrated: bool) -> dict[str, Any]:
    """What data the compression saw, for the artifact's lineage: the data directory and the
    hash of its manifest (or the built-in corpus), how many rows of what length, and whether
    they calibrated the weights or only measured perplexity."""
    return {"data": "builtin:docs" if data_dir is None else str(data_dir),
            "data_manifest_sha256": None if data_dir is None else storage.sha256(
                storage.join(data_dir, MANIFEST_NAME)),
            "num_calibration_rows": num_calibration if calibrated else 0,
            "num_validation_rows": num_validation, "seq_len": seq_len,
            "used_for": "calibration and evaluation" if calibrated else "evaluation"}


def build_report(
    model_dir: str, out_dir: str, plans: dict[str, LayerPlan], wall_s: float
) -> dict[str, Any]:
    """Sizes (fp32 bytes / stored bytes), perplexity before/after and the wall time of a run."""
    manifest_bytes = storage.read_bytes(storage.join(out_dir, MANIFEST_FILE))
    manifest = json.loads(manifest_bytes)
    comp = manifest["compression"]
    shapes = _expected_shapes(local_model_dir(model_dir))
    fp32_total = sum(4 * _numel(s) for s in shapes.values())
    fp32_linear = sum(4 * _numel(plans[n].shape) for n in plans)
    stored_linear = sum(m["parts"][p]["bytes"] for m in comp["tensors"].values() for p in m["parts"])
    artifact_bytes = sum(f["size"] for f in manifest["files"].values())
    artifact_bytes += len(manifest_bytes)
    return {
        "recipe": comp["recipe"]["name"],
        "out_dir": str(out_dir),
        "num_compressed_tensors": len(plans),
        "linear_fp32_bytes": fp32_linear,
        "linear_stored_bytes": stored_linear,
        "linear_weight_ratio": fp32_linear / max(stored_linear, 1),
        "model_fp32_bytes": fp32_total,
        "artifact_bytes": artifact_bytes,
        "artifact_ratio": fp32_total / max(artifact_bytes, 1),
        "compressed_file_bytes": manifest["files"][COMPRESSED_FILE]["size"],
        "eval": comp.get("eval"),
        "wall_s": wall_s,
    }


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _print_summary(r: dict[str, Any]) -> None:
    line = (f"[compress] done in {r['wall_s']:.1f}s: linear weights {r['linear_fp32_bytes'] / 1e6:.2f} MB -> "
            f"{r['linear_stored_bytes'] / 1e6:.2f} MB ({r['linear_weight_ratio']:.2f}x), artifact "
            f"{r['artifact_bytes'] / 1e6:.2f} MB ({r['artifact_ratio']:.2f}x smaller than fp32)")
    if r["eval"]:
        line += (f"; perplexity {r['eval']['before']['perplexity']:.2f} -> "
                 f"{r['eval']['after']['perplexity']:.2f} ({r['eval']['perplexity_ratio']:.3f}x)")
    print(line, flush=True)
