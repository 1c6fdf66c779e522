"""`fastserve-ray compress ARGS` as a Ray job:

    ray job submit --working-dir . -- python jobs/compress.py --model MODEL_DIR --recipe int8 --out OUT_DIR
"""

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import run_subcommand

run_subcommand("compress")
