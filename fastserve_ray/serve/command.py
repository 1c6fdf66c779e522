"""`fastserve-ray serve` and `jobs/deploy.py`: config from flags/YAML, checks, deploy, serve."""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path
from typing import Any

from fastserve_ray.errors import ConfigError
from fastserve_ray.serve.config import ServeConfig, check_model_dirs


def parse_model_flag(spec: str) -> dict[str, Any]:
    """``DIR`` or ``NAME=DIR`` -> a ``models`` entry."""
    name, sep, path = spec.partition("=")
    if not sep:
        return {"path": spec}
    if not name or not path:
        raise ConfigError(f"--model {spec!r}: expected DIR or NAME=DIR")
    return {"path": path, "name": name}


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
CLUSTER_HOST = "0.0.0.0"  # what a deployment to a cluster binds when no host is given


def config_from_args(args: argparse.Namespace, joining: bool = False) -> ServeConfig:
    """The serving config: YAML (if any) with the command-line flags on top.

    ``joining`` (deploying to a running cluster): with no host in the flags or the YAML, the
    proxy binds CLUSTER_HOST, so that clients outside the head's pod or machine reach it;
    local runs keep 127.0.0.1.
    """
    from fastserve_ray.config import load_yaml

    values: dict[str, Any] = load_yaml(args.config) if getattr(args, "config", None) else {}
    if "applications" in values:  # a Serve config file (deployments/serve.yaml): our app's args
        apps = [a for a in values["applications"] or [] if isinstance(a, dict)
                and str(a.get("import_path", "")).endswith("builder:build_app")]
        if len(apps) != 1:
            raise ConfigError(f"{args.config}: expected one application with import_path "
                              "fastserve_ray.serve.builder:build_app")
        values = dict(apps[0].get("args") or {})
    if args.model:
        values["models"] = [parse_model_flag(s) for s in args.model]
    if not values.get("models"):
        raise ConfigError("no model to serve: pass --model MODEL_DIR or a --config with models")
    http = dict(values.get("http") or {})
    for flag, key in (("host", "host"), ("port", "port"), ("api_key", "api_key")):
        if getattr(args, flag, None) is not None:
            http[key] = getattr(args, flag)
    if joining and "host" not in http:
        http["host"] = CLUSTER_HOST
    values["http"] = http
    if getattr(args, "ingress", None) is not None:
        values["ingress"] = args.ingress
    models = []
    for m in values["models"]:
        m = dict(m) if isinstance(m, dict) else m
        if isinstance(m, dict):
            auto = dict(m.get("autoscaling") or {})
            if getattr(args, "min_replicas", None) is not None:
                auto["min_replicas"] = args.min_replicas
            if getattr(args, "max_replicas", None) is not None:
                auto["max_replicas"] = args.max_replicas
            if auto:
                m["autoscaling"] = auto
        models.append(m)
    values["models"] = models
    return ServeConfig.from_dict(values, where=str(args.config) if getattr(args, "config", None) else "serve")


def require_key_off_loopback(cfg: ServeConfig) -> None:
    """ConfigError when the proxy would answer the network without an API key.

    Serve's proxy takes no token of its own: our key check is the only guard on /v1.
    """
    if cfg.http.host not in LOOPBACK_HOSTS and not cfg.resolved_api_key():
        raise ConfigError(
            f"http.host {cfg.http.host!r} exposes the OpenAI routes beyond this machine without an API key: "
            "set --api-key (or http.api_key, or the FASTSERVE_API_KEY environment variable), or bind "
            "--host 127.0.0.1")


def check_port_free(host: str, port: int) -> None:
    """Fail early (before deploying) when another process listens on host:port."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"http port {host}:{port} is not available ({e.strerror}); "
                              "pick another with --port") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deploy(cfg: ServeConfig, *, start_http: bool = True, log_level: str = "INFO") -> str:
    """Deploy ``cfg`` on the connected Ray (starting Serve's proxy on its host/port); the base URL.

    ``log_level`` applies to Serve's controller, proxies and replicas (WARNING drops access logs).
    """
    from ray import serve

    from fastserve_ray.serve.builder import build_app

    app = build_app(cfg)  # validates model dirs and options before anything starts
    logging_config = {"log_level": log_level}
    if start_http:
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port},
                    proxy_location=cfg.http.proxy_location, logging_config=logging_config)
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False,
              logging_config=logging_config)
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    return f"http://{host}:{_serve_http_port(cfg.http.port)}{cfg.route_prefix.rstrip('/')}"


def _serve_http_port(asked: int) -> int:
    """The port Serve's proxies listen on: the one asked for, unless Serve was already running
    on the cluster (serve.start then keeps its own options and says so)."""
    try:
        from ray.serve.context import _get_global_client  # no public accessor in Ray 2.60

        return int(_get_global_client().http_config.port)
    except Exception:  # noqa: BLE001 - an unknown client shape: the asked port is the best guess
        return asked


def _dashboard_url() -> str | None:
    # Ray has no public accessor for it after init; a missing dashboard is not an error.
    try:
        from ray._private.worker import get_dashboard_url

        return get_dashboard_url() or None
    except Exception:
        return None


def run_serve_command(args: argparse.Namespace) -> int:
    """Deploy the models and serve until Ctrl-C (or return at once with --detach)."""
    import os

    import ray
    from ray import serve

    from fastserve_ray.cluster import ensure_ray

    joining = bool(args.address) or bool(os.environ.get("RAY_ADDRESS"))
    cfg = config_from_args(args, joining=joining)
    require_key_off_loopback(cfg)
    check_model_dirs(cfg)
    if args.detach and not joining:
        raise ConfigError("--detach needs a running cluster to deploy to (--address or RAY_ADDRESS); "
                          "a private local Ray would end with this process")
    if not joining:
        check_port_free(cfg.http.host, cfg.http.port)
    ensure_ray(address=args.address)
    try:  # Ctrl-C may come while the replicas are still starting: shut down cleanly then too
        url = deploy(cfg)
        dashboard = _dashboard_url()
        names = ", ".join(m.served_name for m in cfg.models)
        print(f"serving {names} at {url}/v1 (OpenAI API; GET {url}/v1/models)", flush=True)
        if dashboard:
            print(f"Ray dashboard: http://{dashboard}")
        print(f"Ray address for handle clients: RAY_ADDRESS={ray.get_runtime_context().gcs_address}")
        if args.detach:
            return 0
        print("Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down Serve ...", flush=True)
        serve.shutdown()
    return 0


def model_dir_config(model_dir: str | Path, **http: Any) -> ServeConfig:
    """A one-model config with defaults (what `fastserve-ray serve --model DIR` builds)."""
    return ServeConfig.from_dict({"models": [{"path": str(model_dir)}], "http": http})
