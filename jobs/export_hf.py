"""`fastserve-ray export-hf ARGS` as a Ray job:

    ray job submit --working-dir . -- python jobs/export_hf.py ARGS
"""

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import run_subcommand

run_subcommand("export-hf")
