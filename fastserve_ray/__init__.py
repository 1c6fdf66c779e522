"""fastserve-ray: train, compress and serve language models on Ray."""

__version__ = "0.1.0"
