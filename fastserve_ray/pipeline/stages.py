"""The pipeline's stages: each says what it consumes (for the skip check), does its work, and can
check that what it once wrote is still there, unchanged.

Locations are joined under the pipeline's ``out`` (a local path or ``s3://...``):
``data/``, ``run/`` (its ``model/``), ``compressed-RECIPE/``, ``eval.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve_ray import storage
from fastserve_ray.errors import FastServeError
from fastserve_ray.pipeline.config import PipelineConfig
from fastserve_ray.pipeline.records import model_fingerprint

Outputs = dict[str, Any]


@dataclass
class Stage:
    """One step: ``inputs`` (hashed for the skip check), ``run``, and ``verify`` of old outputs."""

    name: str
    inputs: Callable[[dict[str, Outputs]], dict[str, Any]]
    run: Callable[[dict[str, Outputs]], Outputs]
    verify: Callable[[Outputs], bool] | None = None  # None: the stage always runs (deploy, smoke)


def _recipe_key(recipe: str) -> str:
    return Path(recipe).stem


def _model_verifies(location: str, fingerprint: str) -> bool:
    from fastserve_ray.models.model_dir import read_manifest

    try:
        # A URI is read into this node's cache, checksums verified on the way.
        return model_fingerprint(read_manifest(location, verify=True)) == fingerprint
    except FastServeError:
        return False


def build_stages(cfg: PipelineConfig) -> list[Stage]:
    """The stages of ``cfg`` in order."""
    out = cfg.out.rstrip("/")
    data_dir = storage.join(out, "data")
    run_dir = storage.join(out, "run")

    def prepare(_: dict[str, Outputs]) -> Outputs:
        from fastserve_ray.data import prepare_data
        from fastserve_ray.data.manifest import MANIFEST_NAME

        d = cfg.data
        prepare_data(data_dir, d.inputs or None, text_field=d.text_field, vocab_size=d.vocab_size,
                     seq_len=d.seq_len, overwrite=True)
        sha = storage.sha256(storage.join(data_dir, MANIFEST_NAME))
        return {"data": data_dir, "data_manifest_sha256": sha}

    def prepare_ok(o: Outputs) -> bool:
        from fastserve_ray.data import load_data_manifest
        from fastserve_ray.data.manifest import MANIFEST_NAME

        try:
            load_data_manifest(o["data"], verify=True)
            return storage.sha256(storage.join(o["data"], MANIFEST_NAME)) == o["data_manifest_sha256"]
        except (FastServeError, OSError):
            return False

    def train(_: dict[str, Outputs]) -> Outputs:
        from fastserve_ray.cluster import ensure_ray
        from fastserve_ray.config import TrainConfig
        from fastserve_ray.models.model_dir import read_manifest
        from fastserve_ray.train.trainer import run_training

        ensure_ray()
        # A fixed run name: a rerun after a killed driver resumes from the last checkpoint.
        train_cfg = TrainConfig.from_dict({"run_name": "pipeline", **cfg.train}, where="train")
        result = run_training(data_dir, run_dir, train_cfg)
        model = str(result.model_dir)
        return {"model": model, "fingerprint": model_fingerprint(read_manifest(model, verify=False)),
                "final_metrics": result.metrics, "resumes": result.resumes}

    def model_ok(o: Outputs) -> bool:
        return _model_verifies(o["model"], o["fingerprint"])

    stages = [
        Stage("prepare", lambda _: {"data": cfg.data.model_dump(), "out": data_dir}, prepare, prepare_ok),
        Stage("train", lambda done: {"train": cfg.train, "data": done["prepare"]["data_manifest_sha256"]},
              train, model_ok),
    ]
    for recipe in cfg.compress:
        stages.append(_compress_stage(recipe, out, data_dir, model_ok))
    stages.append(_evaluate_stage(cfg, data_dir, out))
    if cfg.deploy.enabled:
        stages += [Stage("deploy", lambda done: {}, lambda done: _deploy(cfg, done)),
                   Stage("smoke", lambda done: {}, lambda done: _smoke(cfg, done))]
    return stages


def _compress_stage(recipe: str, out: str, data_dir: str, model_ok: Callable[[Outputs], bool]) -> Stage:
    key = _recipe_key(recipe)
    dest = storage.join(out, f"compressed-{key}")

    def run(done: dict[str, Outputs]) -> Outputs:
        from fastserve_ray.cluster import ensure_ray
        from fastserve_ray.compress.graph import run_graph
        from fastserve_ray.compress.pipeline import CompressOptions
        from fastserve_ray.compress.recipe import load_recipe
        from fastserve_ray.models.model_dir import read_manifest

        ensure_ray()
        result = run_graph(done["train"]["model"], dest, load_recipe(recipe), data_dir,
                           CompressOptions(overwrite=True))
        return {"model": dest, "fingerprint": model_fingerprint(read_manifest(dest, verify=False)),
                "report": {k: result.report[k] for k in ("linear_weight_ratio", "artifact_ratio", "eval")}}

    return Stage(f"compress-{key}", lambda done: {"recipe": recipe, "model": done["train"]["fingerprint"],
                                                  "data": done["prepare"]["data_manifest_sha256"]},
                 run, model_ok)


def artifacts(done: dict[str, Outputs]) -> dict[str, str]:
    """Model directories by name: "trained" and each recipe's key."""
    found = {"trained": done["train"]["model"]}
    for stage, o in done.items():
        if stage.startswith("compress-"):
            found[stage.removeprefix("compress-")] = o["model"]
    return found


def _evaluate_stage(cfg: PipelineConfig, data_dir: str, out: str) -> Stage:
    report = storage.join(out, "eval.json")

    def inputs(done: dict[str, Outputs]) -> dict[str, Any]:
        return {"evaluate": cfg.evaluate.model_dump(), "data": done["prepare"]["data_manifest_sha256"],
                "models": {n: done["train" if n == "trained" else f"compress-{n}"]["fingerprint"]
                           for n in artifacts(done)}}

    def run(done: dict[str, Outputs]) -> Outputs:
        from fastserve_ray.data import read_split
        from fastserve_ray.device import default_device
        from fastserve_ray.models.evaluate import evaluate_rows
        from fastserve_ray.quantized.loader import load_model

        rows = read_split(data_dir, "validation")[: cfg.evaluate.max_rows]
        if len(rows) == 0:
            raise FastServeError(f"{data_dir}: the validation split has no rows to evaluate")
        results = {}
        for name, location in artifacts(done).items():
            metrics = evaluate_rows(load_model(location, device=default_device()).model, rows)
            results[name] = {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}
            print(f"[pipeline] evaluate {name}: perplexity {metrics['perplexity']:.2f}", flush=True)
            record = {"data": data_dir, "data_manifest_sha256": done["prepare"]["data_manifest_sha256"],
                      "split": "validation", "rows": len(rows), **results[name]}
            add_evaluation_to_lineage(location, record)
        storage.write_text_atomic(report, json.dumps(results, indent=2) + "\n")
        return {"report": report, "results": results}

    def verify(o: Outputs) -> bool:
        return storage.is_file(o["report"])

    return Stage("evaluate", inputs, run, verify)


def add_evaluation_to_lineage(location: str, evaluation: dict[str, Any]) -> None:
    """Put the evaluation into a model directory's manifest lineage (the files stay as they are)."""
    from fastserve_ray.models.model_dir import MANIFEST_FILE, read_manifest

    manifest = read_manifest(location, verify=False)
    manifest.setdefault("lineage", {})["evaluation"] = evaluation
    storage.write_text_atomic(storage.join(location, MANIFEST_FILE), json.dumps(manifest, indent=2) + "\n")


def _deploy(cfg: PipelineConfig, done: dict[str, Outputs]) -> Outputs:
    import os

    from fastserve_ray.cluster import ensure_ray
    from fastserve_ray.serve.command import deploy, require_key_off_loopback
    from fastserve_ray.serve.config import ServeConfig

    d = cfg.deploy
    location = artifacts(done)[_recipe_key(d.model)]
    joining = bool(os.environ.get("RAY_ADDRESS"))  # a `ray job submit` driver: the cluster's Serve
    host = d.host or ("0.0.0.0" if joining else "127.0.0.1")
    serve_cfg = ServeConfig.from_dict({"models": [{**d.serve, "path": location, "name": d.name}],
                                       "http": {"host": host, "port": d.port}, "app_name": d.app_name,
                                       "route_prefix": d.route_prefix}, where="deploy")
    require_key_off_loopback(serve_cfg)
    ensure_ray()
    url = deploy(serve_cfg, log_level="WARNING")
    print(f"[pipeline] serving {location} as {d.name!r} at {url}/v1", flush=True)
    return {"url": url, "model": location, "name": d.name, "app_name": d.app_name,
            "api_key": bool(serve_cfg.resolved_api_key())}


def _smoke(cfg: PipelineConfig, done: dict[str, Outputs]) -> Outputs:
    import os

    import httpx

    from fastserve_ray.serve.config import API_KEY_ENV

    dep = done["deploy"]
    key = os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answers = []
    with httpx.Client(base_url=dep["url"], headers=headers, timeout=300) as client:
        for prompt in cfg.smoke.prompts:
            r = client.post("/v1/completions", json={"model": dep["name"], "prompt": prompt,
                                                     "max_tokens": cfg.smoke.max_tokens, "temperature": 0})
            if r.status_code != 200:
                raise FastServeError(f"smoke request {prompt!r} got HTTP {r.status_code}: {r.text[:300]}")
            text = r.json()["choices"][0]["text"]
            print(f"[pipeline] smoke: {prompt}{text}", flush=True)
            answers.append({"prompt": prompt, "text": text})
        card = client.get(f"/v1/models/{dep['name']}").json()
    if "lineage" not in card:
        raise FastServeError(f"GET /v1/models/{dep['name']} carries no lineage: {card}")
    return {"answers": answers, "lineage": card["lineage"]}
