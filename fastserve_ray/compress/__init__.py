"""Compression: pure tensor stages (prune, quantize, encode), the Ray task graph, compressed execution."""
