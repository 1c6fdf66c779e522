"""Serving on Ray Serve: config, LLM server deployment, OpenAI-compatible HTTP ingress, handles, metrics."""
