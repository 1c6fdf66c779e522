"""Scripts run by the peers' own interpreter (.venv-peers/): standard library + the peer only.

Nothing here imports fastserve_ray: the peers' virtual environment does not have it.
"""
