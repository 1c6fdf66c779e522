"""`fastserve-ray train ARGS` as a Ray job:

    ray job submit --working-dir . -- python jobs/train.py --data DATA_DIR --out RUN_DIR --num-workers 2
"""

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import run_subcommand

run_subcommand("train")
