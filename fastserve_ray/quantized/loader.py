"""Load any model directory — plain or compressed — as a ready-to-run model.

Plain directories go straight to ``models.model_dir.load_model_dir``. Compressed ones (their
manifest has a "compression" object) are read through the artifact reader, which verifies
every file; the model is built without its float weights for quantized layers, which are
swapped for ``linear.QuantizedLinear`` / ``rnn.QuantizedRNN`` modules that keep the
weights compressed in memory. Quantized tensors of anything else (an embedding) are densified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from fastserve_ray.config import ModelConfig
from fastserve_ray.errors import ModelDirError
from fastserve_ray.models.factory import build_empty_model
from fastserve_ray.models.model_dir import (
    TOKENIZER_FILE,
    LoadedModel,
    check_tokenizer_fits,
    load_model_dir,
    read_config,
    read_manifest,
)
from fastserve_ray.models.model_store import local_model_dir
from fastserve_ray.models.weights import state_dict_for_saving
from fastserve_ray.quantized.fused import QuantizedFusedLinear, fuse_quantized_projections
from fastserve_ray.quantized.linear import KERNELS, QuantizedLinear
from fastserve_ray.quantized.qtensor import QuantizedWeight
from fastserve_ray.quantized.rnn import QuantizedRNN
from fastserve_ray.tokenizer import Tokenizer

# Weight-only kernels: batch-invariant (a row's result never depends on the other rows).
DEFAULT_KERNELS = ("int8pack", "int8row", "int4pack", "dequant")
Tensors = Mapping[str, "torch.Tensor | QuantizedWeight"]


def resolve_kernels(kernels: str | Iterable[str] | None) -> tuple[str, ...]:
    """'auto' (None) -> the weight-only kernels; 'all' adds dynamic int8; else the names given."""
    if kernels is None or kernels == "auto":
        return DEFAULT_KERNELS
    if kernels == "all":
        return KERNELS
    names = (kernels,) if isinstance(kernels, str) else tuple(kernels)
    unknown = [k for k in names if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; choose from {KERNELS}, 'auto' or 'all'")
    return tuple(dict.fromkeys((*names, "dequant")))  # dequant: the fallback for misfit shapes


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    kernels: str | Iterable[str] | None = "auto",
) -> LoadedModel:
    """Load a plain or compressed model directory on ``device``, in eval mode (see module doc)."""
    from fastserve_ray.quantized.artifact import is_compressed_model_dir, read_compressed_tensors

    model_dir = local_model_dir(model_dir)  # a URI: this node's verified copy (models/model_store.py)
    if not is_compressed_model_dir(model_dir):
        return load_model_dir(model_dir, device=device, dtype=dtype, verify=verify)
    # The artifact reader verifies every file's sha256 and each tensor's format and shape.
    tensors, _compression = read_compressed_tensors(model_dir, verify=verify)
    manifest = read_manifest(model_dir, verify=False)
    config = read_config(model_dir)
    tokenizer = Tokenizer.load(model_dir / TOKENIZER_FILE)
    check_tokenizer_fits(tokenizer, config, str(model_dir))
    model = build_compressed_model(config, tensors, model_dir, device=device, dtype=dtype, kernels=kernels)
    return LoadedModel(model, config, tokenizer, manifest, model_dir)


def build_compressed_model(
    config: ModelConfig,
    tensors: Tensors,
    source: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    kernels: str | Iterable[str] | None = "auto",
) -> nn.Module:
    """A model for ``config`` from float tensors and QuantizedWeights, quantized layers swapped in."""
    device = torch.device(device)
    names = resolve_kernels(kernels)
    model = build_empty_model(config)  # uninitialised floats: untouched pages cost no memory
    _check_names_and_shapes(model, tensors, source)
    quantized = {n: t for n, t in tensors.items() if isinstance(t, QuantizedWeight)}
    floats = {n: t for n, t in tensors.items() if not isinstance(t, QuantizedWeight)}
    swaps: dict[str, QuantizedWeight] = {}
    rnn_modules: set[str] = set()
    for name, qw in quantized.items():
        module_name, param = name.rpartition(".")[::2]
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) and param == "weight":
            swaps[module_name] = qw
        elif isinstance(module, nn.RNNBase) and param.startswith(("weight_ih_l", "weight_hh_l")):
            rnn_modules.add(module_name)
        else:
            floats[name] = qw.dequantize(torch.float32)  # no kernel for it: densified at load
    model.load_state_dict(floats, strict=False)
    with torch.no_grad():
        for module_name, qw in swaps.items():
            old = model.get_submodule(module_name)
            bias = None if old.bias is None else old.bias.to(dtype or old.bias.dtype)
            _set_submodule(model, module_name, QuantizedLinear(qw, bias, device=device, kernels=names))
        for module_name in rnn_modules:
            rnn = model.get_submodule(module_name)
            _set_submodule(model, module_name, _quantized_rnn(rnn, module_name, quantized, device, dtype,
                                                              names))
    model = model.to(device=device, dtype=dtype).eval()
    fuse_quantized_projections(model)
    probe_model(model)
    return model


def probe_model(model: nn.Module) -> None:
    """Choose every quantized layer's kernels now (in the model's dtype), not on the first request."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedFusedLinear)):
            module.plan_for(dtype)


def _check_names_and_shapes(model: nn.Module, tensors: Tensors, source: Path | str) -> None:
    expected = {name: tuple(t.shape) for name, t in state_dict_for_saving(model).items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelDirError(
            f"weights in {source} do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name]:
            raise ModelDirError(
                f"tensor {name!r} in {source} has shape {tuple(t.shape)}, the config needs {expected[name]}"
            )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _quantized_rnn(
    rnn: nn.RNNBase,
    name: str,
    quantized: Mapping[str, QuantizedWeight],
    device: torch.device,
    dtype: torch.dtype | None,
    kernels: tuple[str, ...],
) -> QuantizedRNN:
    """The RNN's per-layer input/hidden projections as (quantized) linears in a QuantizedRNN."""
    if not rnn.batch_first or rnn.bidirectional or getattr(rnn, "proj_size", 0):
        raise ModelDirError(f"{name}: only batch-first, unidirectional RNNs without projections run "
                            "quantized")
    mode = "rnn" if rnn.mode.startswith("RNN") else rnn.mode.lower()  # RNN_TANH / RNN_RELU
    out = QuantizedRNN(mode, rnn.hidden_size, rnn.num_layers, getattr(rnn, "nonlinearity", "tanh"))
    for layer in range(rnn.num_layers):
        projections = []
        for kind in ("ih", "hh"):
            weight = getattr(rnn, f"weight_{kind}_l{layer}")
            bias = getattr(rnn, f"bias_{kind}_l{layer}", None) if rnn.bias else None
            qw = quantized.get(f"{name}.weight_{kind}_l{layer}")
            if qw is not None:
                b = None if bias is None else bias.detach().to(dtype or bias.dtype)
                projections.append(QuantizedLinear(qw, b, device=device, kernels=kernels))
            else:
                lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                lin.weight = nn.Parameter(weight.detach().clone())
                if bias is not None:
                    lin.bias = nn.Parameter(bias.detach().clone())
                projections.append(lin)
        out.add_layer(*projections)
    return out
