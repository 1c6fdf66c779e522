"""Running the pipeline: every stage in order, skipping those whose verified output exists.

A rerun after any failure (a killed driver included) therefore resumes at the stage that did not
finish: earlier stages are checked (record, inputs hash, output fingerprint) and left untouched.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastserve_ray import storage
from fastserve_ray.pipeline.config import PipelineConfig
from fastserve_ray.pipeline.records import clear_record, inputs_hash, read_record, write_record
from fastserve_ray.pipeline.stages import build_stages

SUMMARY_FILE = "pipeline.json"


def run_pipeline_job(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns and writes OUT/pipeline.json (stage by stage)."""
    out = cfg.out.rstrip("/")
    stages = build_stages(cfg)
    done: dict[str, Any] = {}
    summary: dict[str, Any] = {"out": out, "stages": {}}
    start = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        title = f"[pipeline] {i}/{len(stages)} {stage.name}"
        want = inputs_hash(stage.inputs(done))
        record = read_record(out, stage.name) if stage.verify is not None else None
        if record and record["inputs_sha256"] == want and stage.verify(record["outputs"]):
            print(f"{title}: done before, output verified - skipped", flush=True)
            done[stage.name] = record["outputs"]
            summary["stages"][stage.name] = {"skipped": True, "seconds": 0.0}
            continue
        why = ("no record" if record is None and stage.verify is not None else
               "always runs" if stage.verify is None else
               "inputs changed" if record["inputs_sha256"] != want else "output missing or changed")
        print(f"{title}: running ({why})", flush=True)
        if stage.verify is not None:
            clear_record(out, stage.name)
        t0 = time.perf_counter()
        done[stage.name] = stage.run(done)
        seconds = time.perf_counter() - t0
        if stage.verify is not None:
            write_record(out, stage.name, want, done[stage.name], seconds)
        summary["stages"][stage.name] = {"skipped": False, "seconds": round(seconds, 2)}
        print(f"{title}: finished in {seconds:.1f}s", flush=True)
    summary["outputs"] = done
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    text = json.dumps(summary, indent=2, default=str) + "\n"
    storage.write_text_atomic(storage.join(out, SUMMARY_FILE), text)
    print(f"[pipeline] done in {summary['wall_s']:.1f}s; summary in {storage.join(out, SUMMARY_FILE)}",
          flush=True)
    return summary
