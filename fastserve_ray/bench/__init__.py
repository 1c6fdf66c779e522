"""Benchmarks behind `fastserve-ray bench ...` and jobs/bench_*.py: JSON + a table, side by side."""
