"""The building blocks a decoder is made of, one implementation per file, chosen by the engine plan.

- ``fused.py``: ``FusedLinear``, projections of one input (q|k|v, gate|up) as one product, and
  ``install_fused``; ``packed_linear.py``: oneDNN-packed ``nn.Linear`` weights on CPU and their
  fused form (the int8 form is ``quantized/fused.py``);
- ``int8_rows.py``: the contract by which a linear offers int8 rows to the one-call decode layer;
- ``attention.py``: attention over the paged KV cache (per sequence, with the native CPU decode
  kernel), ``flex_attention.py``: the same as one flex_attention call over the pool;
- ``norm.py``: RMSNorm (with the residual add), ``rotary.py``: RoPE.

Layers call only downward (kernels, torch); models compose them, the engine chooses them.
"""
