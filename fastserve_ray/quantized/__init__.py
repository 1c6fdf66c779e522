"""Serving compressed weights: the compressed model-directory format and the layers that run it.

``compress/`` is the offline Ray pipeline that writes compressed directories; this package is
what reads and executes them (the engine imports this, never ``compress``):

- ``qtensor.py``: ``QuantizedWeight``, integer weights with their scales;
- ``codec.py``, ``artifact.py``: the on-disk format (bit packing, entropy coding, checksums);
- ``linear.py``, ``fused.py``, ``rnn.py``: drop-ins for ``nn.Linear`` / fused projections /
  ``nn.RNN`` that keep weights quantized in memory;
- ``autotune.py``: each layer's kernel chosen by measurement;
- ``loader.py``: any model directory, plain or compressed, as a ready-to-run model.
"""
