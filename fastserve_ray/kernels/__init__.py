"""Native kernels the models call where PyTorch has no fast op: built on first use, optional.

Each kernel is C++ compiled with ``torch.utils.cpp_extension`` the first time a process needs
it (about 30 s on 2 cores; kept on disk afterwards, see ``paged_decode.py`` for how a build
survives crashes and races). Where it cannot be built (no compiler,
an unsupported device) or ``FASTSERVE_NATIVE_KERNELS=0`` is set, callers fall back to their
PyTorch path, which computes the same thing.
"""
