"""The KubeRay manifests validate against the KubeRay CRDs' own schemas (v1.7.0, vendored).

The API server prunes unknown fields of a structural schema silently, so a misspelled key
(``minReplica``) would be dropped without a word on ``kubectl apply``. Validation here is
stricter: every object schema that lists its properties and does not preserve unknown fields
refuses others, so a typo fails the test (shown by the negative cases).
"""

from __future__ import annotations

import copy
import gzip
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from fastserve_ray.cli import build_parser
from fastserve_ray.errors import ConfigError
from fastserve_ray.serve import kuberay
from fastserve_ray.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "data" / "kuberay-v1.7.0"
MANIFESTS = sorted((ROOT / "deployments" / "kuberay").glob("*.yaml"))
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def _strict(schema: object) -> object:
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    with gzip.open(CRDS / f"ray.io_{KINDS[kind]}.yaml.gz") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _errors(doc: dict) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in KINDS
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(doc["kind"]).iter_errors(doc)
    ]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_against_its_crd(path: Path) -> None:
    assert _errors(_load(path)) == []


def test_the_manifests_cover_a_gpu_cluster_jobs_and_the_service() -> None:
    kinds = sorted(_load(p)["kind"] for p in MANIFESTS)
    assert kinds.count("RayJob") >= 2 and "RayCluster" in kinds and "RayService" in kinds
    cluster = _load(ROOT / "deployments" / "kuberay" / "raycluster-gpu.yaml")["spec"]
    assert (
        cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0" and cluster["enableInTreeAutoscaling"]
    )
    (gpus,) = cluster["workerGroupSpecs"]
    assert gpus["minReplicas"] == 0 < gpus["maxReplicas"]
    limits = gpus["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_a_misspelled_field_fails_validation() -> None:
    doc = _load(ROOT / "deployments" / "kuberay" / "raycluster-gpu.yaml")
    typo = copy.deepcopy(doc)
    group = typo["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")
    assert any("minReplica" in e for e in _errors(typo))
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in _errors(wrong_type))
    job = _load(ROOT / "deployments" / "kuberay" / "rayjob-train.yaml")
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in _errors(job))


def _mounts(spec: dict) -> set[str]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return {
        m["mountPath"]
        for g in groups
        for c in g["template"]["spec"]["containers"]
        for m in c.get("volumeMounts", [])
    }


def _on_storage(path: str, mounts: set[str]) -> bool:
    return path.startswith("s3://") or any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayjob")], ids=lambda p: p.name)
def test_job_entrypoints_exist_parse_and_keep_models_on_shared_storage(path: Path) -> None:
    spec = _load(path)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv[:2]
    command = Path(argv[1]).stem.replace("_", "-")
    args = build_parser().parse_args([command, *argv[2:]])  # the job's flags are the CLI's
    mounts = _mounts(spec["rayClusterSpec"])
    for flag in ("data", "out", "model"):
        value = getattr(args, flag, None)
        if value is not None:
            assert _on_storage(str(value), mounts), (flag, value)


def test_the_service_serves_the_shipped_application_from_a_mounted_volume() -> None:
    service = _load(ROOT / "deployments" / "kuberay" / "rayservice.yaml")["spec"]
    serve_cfg = yaml.safe_load(service["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    shipped = _load(ROOT / "deployments" / "serve.yaml")["applications"][0]
    assert app["import_path"] == shipped["import_path"]
    cfg = ServeConfig.from_dict(app["args"])
    mounts = _mounts(service["rayClusterConfig"])
    assert all(_on_storage(m.path, mounts) for m in cfg.models)


def test_object_storage_uris_survive_the_command_line() -> None:
    # Path("s3://b/k") is "s3:/b/k": the CLI keeps URIs as given (found by the RayJob check above).
    args = build_parser().parse_args(
        ["train", "--data", "s3://b/data", "--out", "s3://b/run", "--storage-path", "s3://b/ckpt"]
    )
    assert (args.data, args.out, args.storage_path) == ("s3://b/data", "s3://b/run", "s3://b/ckpt")
    args = build_parser().parse_args(["prepare-data", "--out", "s3://b/data", "--input", "corpus.txt"])
    assert args.out == "s3://b/data" and args.input == [Path("corpus.txt")]


def test_the_service_config_is_serve_yaml_with_the_overlay_and_is_up_to_date(capsys) -> None:
    service = _load(ROOT / "deployments" / "kuberay" / "rayservice.yaml")["spec"]
    merged = kuberay.merge(_load(ROOT / "deployments" / "serve.yaml"),
                           _load(ROOT / "deployments" / "serve-kuberay-overlay.yaml"))
    assert yaml.safe_load(service["serveConfigV2"]) == merged
    assert kuberay.main(["--check"]) == 0, capsys.readouterr().err
    model = merged["applications"][0]["args"]["models"][0]
    shipped = _load(ROOT / "deployments" / "serve.yaml")["applications"][0]["args"]["models"][0]
    assert model["max_queued_requests"] == shipped["max_queued_requests"]  # from serve.yaml
    assert model["path"] == "/models/demo" and model["autoscaling"]["max_replicas"] == 4  # overlay


def test_a_changed_serve_yaml_makes_the_service_config_stale_until_regenerated(tmp_path, capsys) -> None:
    serve_yaml = tmp_path / "serve.yaml"
    text = (ROOT / "deployments" / "serve.yaml").read_text()
    assert "max_num_seqs: 16" in text
    serve_yaml.write_text(text.replace("max_num_seqs: 16", "max_num_seqs: 24"))
    service = tmp_path / "rayservice.yaml"
    service.write_text((ROOT / "deployments" / "kuberay" / "rayservice.yaml").read_text())
    args = ["--serve-config", str(serve_yaml), "--rayservice", str(service)]
    assert kuberay.main([*args, "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert kuberay.main(args) == 0
    cfg = yaml.safe_load(_load(service)["spec"]["serveConfigV2"])
    assert cfg["applications"][0]["args"]["models"][0]["engine"]["max_num_seqs"] == 24
    assert kuberay.main([*args, "--check"]) == 0


def test_overlay_merge_rules() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "apps": [{"name": "p", "v": 1}, {"name": "q", "v": 2}]}
    overlay = {"a": {"y": [3]}, "apps": [{"name": "q", "v": 5}, {"name": "r", "v": 6}], "b": 7}
    assert kuberay.merge(base, overlay) == {
        "a": {"x": 1, "y": [3]}, "b": 7,
        "apps": [{"name": "p", "v": 1}, {"name": "q", "v": 5}, {"name": "r", "v": 6}],
    }
    assert base["apps"][1]["v"] == 2  # inputs untouched
    with pytest.raises(ConfigError, match=r"overlay\.a: a mapping meets a non-mapping"):
        kuberay.merge(base, {"a": 3})


def test_the_gpu_service_is_generated_asks_for_gpus_and_scales_from_zero(capsys) -> None:
    path = ROOT / "deployments" / "kuberay" / "rayservice-gpu.yaml"
    overlay = ROOT / "deployments" / "serve-kuberay-gpu-overlay.yaml"
    assert kuberay.main(["--overlay", str(overlay), "--rayservice", str(path), "--check"]) == 0, \
        capsys.readouterr().err
    spec = _load(path)["spec"]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    (model,) = ServeConfig.from_dict(app["args"]).models
    assert model.num_gpus == 1 and model.autoscaling.min_replicas == 0
    assert _on_storage(model.path, _mounts(spec["rayClusterConfig"]))
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
