"""Recurrent layers (RNN/LSTM/GRU) whose weight matrices stay quantized."""

from __future__ import annotations

import torch
from torch import nn


class QuantizedRNN(nn.Module):
    """Drop-in for a batch-first ``nn.RNN``/``nn.LSTM``/``nn.GRU`` whose weight matrices are
    ``QuantizedLinear``s: each layer's input projection runs over the whole sequence at once,
    the hidden projection once per time step, with torch's gate equations."""

    def __init__(self, mode: str, hidden_size: int, num_layers: int, nonlinearity: str = "tanh") -> None:
        super().__init__()
        if mode not in ("rnn", "lstm", "gru"):
            raise ValueError(f"unknown recurrent mode {mode!r}")
        self.mode, self.hidden_size, self.num_layers = mode, hidden_size, num_layers
        self.act = torch.tanh if nonlinearity == "tanh" else torch.relu
        self.ih = nn.ModuleList()
        self.hh = nn.ModuleList()

    def add_layer(self, ih: nn.Module, hh: nn.Module) -> None:
        """Append one layer's input and hidden projections (each holds its bias)."""
        self.ih.append(ih)
        self.hh.append(hh)

    def _cell(self, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, hh: nn.Module):
        gh = hh(h)
        if self.mode == "rnn":
            return self.act(gi + gh), None
        if self.mode == "lstm":
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        r_i, z_i, n_i = gi.chunk(3, dim=-1)
        r_h, z_h, n_h = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * n_h)
        return (1 - z) * n + z * h, None

    def forward(self, x: torch.Tensor, hx=None):  # noqa: ANN001 - nn.RNN's signature
        B, T, _ = x.shape  # batch_first
        if hx is None:
            zeros = x.new_zeros(self.num_layers, B, self.hidden_size)
            hx = (zeros, zeros.clone()) if self.mode == "lstm" else zeros
        h0, c0 = hx if self.mode == "lstm" else (hx, None)
        hs, cs = [], []
        for layer in range(self.num_layers):
            gates = self.ih[layer](x)  # (B, T, G*H): the input projection for all steps at once
            h = h0[layer]
            c = None if c0 is None else c0[layer]
            outs = []
            for t in range(T):
                h, c = self._cell(gates[:, t], h, c, self.hh[layer])
                outs.append(h)
            x = torch.stack(outs, dim=1)
            hs.append(h)
            cs.append(c)
        h_n = torch.stack(hs)
        return x, ((h_n, torch.stack(cs)) if self.mode == "lstm" else h_n)
