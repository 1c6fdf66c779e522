"""Stage records: what a finished stage consumed and produced, so a rerun can skip it.

``OUT/pipeline/STAGE.json`` holds the hash of the stage's inputs (its options and its upstream
outputs' fingerprints) and the fingerprint of what it wrote. A stage is skipped only when its
record exists, its inputs hash is today's, and its output still verifies with the same
fingerprint; anything else (no record, changed options, a changed upstream, a damaged output)
runs it again. Records are written last, after the output is complete: a stage killed halfway
has no record and reruns (training then resumes from its last checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Any

from fastserve_ray import storage
from fastserve_ray.errors import DataError

RECORDS_DIR = "pipeline"


def inputs_hash(inputs: dict[str, Any]) -> str:
    """sha256 of a stage's inputs (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(manifest: dict[str, Any]) -> str:
    """A model directory's content hash: its manifest's file list (names, sizes, sha256s).

    Not the manifest's own bytes: the evaluate stage adds its figures to the lineage of the
    served artifact, which must not make the stage that wrote the weights run again.
    """
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def record_path(out: str, stage: str) -> str:
    return storage.join(out, RECORDS_DIR, f"{stage}.json")


def read_record(out: str, stage: str) -> dict[str, Any] | None:
    """The stage's record, or None when it has none (or an unreadable one)."""
    path = record_path(out, stage)
    try:
        if not storage.is_file(path):
            return None
        return json.loads(storage.read_bytes(path))
    except (OSError, DataError, json.JSONDecodeError):
        return None


def write_record(out: str, stage: str, inputs: str, outputs: dict[str, Any], seconds: float) -> None:
    """Record a finished stage (one small write: a rename locally, a single PUT on object stores)."""
    record = {"stage": stage, "inputs_sha256": inputs, "outputs": outputs, "seconds": round(seconds, 3),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text_atomic(record_path(out, stage), json.dumps(record, indent=2) + "\n")


def clear_record(out: str, stage: str) -> None:
    """Forget a stage (before running it again): a half-rewritten output is never trusted."""
    fs, inner = storage.resolve(record_path(out, stage))
    with contextlib.suppress(OSError):  # FileNotFoundError included: nothing to forget
        fs.delete_file(inner)
