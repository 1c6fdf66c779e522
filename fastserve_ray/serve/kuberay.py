"""The RayService's serveConfigV2, generated from deployments/serve.yaml plus a cluster overlay.

`deployments/serve.yaml` is the one Serve application; what differs on Kubernetes (bind every
interface, models on a mounted volume, more replicas) lives in a small overlay file
(`deployments/serve-kuberay-overlay.yaml`). This module merges the two and writes the result
into the RayService manifest's ``serveConfigV2`` block, so the two can never drift apart: the
tests regenerate it and compare with what is committed.

    python -m fastserve_ray.serve.kuberay            # rewrite deployments/kuberay/rayservice.yaml
    python -m fastserve_ray.serve.kuberay --check    # exit 1 if the committed block is stale

Merge rules: mappings merge key by key (the overlay wins); lists of mappings that all have a
``name`` (``applications``, ``models``) merge item by item by name, and an overlay item with a
new name is appended; any other value, lists included, is replaced by the overlay's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from fastserve_ray.errors import ConfigError
from fastserve_ray.storage import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = ROOT / "deployments" / "serve.yaml"
OVERLAY_YAML = ROOT / "deployments" / "serve-kuberay-overlay.yaml"
RAYSERVICE_YAML = ROOT / "deployments" / "kuberay" / "rayservice.yaml"
BLOCK_START = "  serveConfigV2: |\n"
BLOCK_END = "  rayClusterConfig:\n"
INDENT = "    "


def _named(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(i, dict) and "name" in i for i in items)


def merge(base: Any, overlay: Any, where: str = "") -> Any:
    """``overlay`` applied on ``base`` by the rules in the module docstring (neither is changed)."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = merge(base[key], value, f"{where}.{key}") if key in base else value
        return out
    if _named(base) and _named(overlay):
        out = list(base)
        index = {item["name"]: i for i, item in enumerate(base)}
        for item in overlay:
            if item["name"] in index:
                i = index[item["name"]]
                out[i] = merge(base[i], item, f"{where}[{item['name']}]")
            else:
                out.append(item)
        return out
    if isinstance(base, dict) != isinstance(overlay, dict):
        raise ConfigError(f"overlay{where or ' root'}: a mapping meets a non-mapping; cannot merge")
    return overlay


def _load(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def serve_config_v2(serve_yaml: Path = SERVE_YAML, overlay_yaml: Path = OVERLAY_YAML) -> str:
    """The YAML text of the merged Serve config (what goes into serveConfigV2)."""
    merged = merge(_load(serve_yaml), _load(overlay_yaml))
    return yaml.safe_dump(merged, sort_keys=False, default_flow_style=False)


def _repo_relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render_rayservice(manifest_text: str, config_text: str,
                      sources: str = "deployments/serve.yaml + an overlay") -> str:
    """``manifest_text`` with its serveConfigV2 block replaced by ``config_text``."""
    start = manifest_text.find(BLOCK_START)
    end = manifest_text.find(BLOCK_END, start + 1)
    if start < 0 or end < 0:
        raise ConfigError(
            f"the RayService manifest needs a {BLOCK_START.strip()!r} block followed by "
            f"{BLOCK_END.strip()!r} at two-space indentation"
        )
    header = (f"{INDENT}# Generated from {sources}\n"
              f"{INDENT}# by `python -m fastserve_ray.serve.kuberay`: edit those, not this block.\n")
    body = "".join(f"{INDENT}{line}\n" for line in config_text.splitlines())
    return manifest_text[: start + len(BLOCK_START)] + header + body + manifest_text[end:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, verify) the RayService manifest's serveConfigV2."""
    parser = argparse.ArgumentParser(prog="python -m fastserve_ray.serve.kuberay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-config", type=Path, default=SERVE_YAML)
    parser.add_argument("--overlay", type=Path, default=OVERLAY_YAML)
    parser.add_argument("--rayservice", type=Path, default=RAYSERVICE_YAML)
    parser.add_argument("--check", action="store_true", help="only verify; exit 1 if it is stale")
    args = parser.parse_args(argv)
    try:
        current = args.rayservice.read_text()
        sources = f"{_repo_relative(args.serve_config)} + {_repo_relative(args.overlay)}"
        wanted = render_rayservice(current, serve_config_v2(args.serve_config, args.overlay), sources)
    except (OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if current == wanted:
        print(f"{args.rayservice}: serveConfigV2 is up to date")
        return 0
    if args.check:
        print(f"{args.rayservice}: serveConfigV2 is stale; run python -m fastserve_ray.serve.kuberay",
              file=sys.stderr)
        return 1
    write_text_atomic(args.rayservice, wanted)
    print(f"{args.rayservice}: serveConfigV2 rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
