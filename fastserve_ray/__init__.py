"""fastserve-ray: train, compress and serve language models on Ray."""

from fastserve_ray.envs import apply_forced_isa

__version__ = "0.1.0"

# Before any oneDNN primitive exists: a forced FASTSERVE_CPU_ISA must reach oneDNN too.
apply_forced_isa()
