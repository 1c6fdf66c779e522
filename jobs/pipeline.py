"""`fastserve-ray pipeline ARGS` as a Ray job (data -> train -> compress -> evaluate -> deploy -> smoke):

    ray job submit --working-dir . -- python jobs/pipeline.py --config deployments/pipeline.yaml

Rerunning the same command after a failure resumes at the first unfinished stage.
"""

import _path  # noqa: F401  (repository root on sys.path)

from fastserve_ray.cli import run_subcommand

run_subcommand("pipeline")
