"""Load-time fusion of an attention layer's separate query, key and value projections into one matrix product.

GPT-J (and GPT-Neo, CodeGen-style models) project q, k and v with three
matrices of the same input. At batch size 1 a decode step is a chain of
matrix-vector products that stream weights from memory; one product over the
stacked [3h, h] matrix streams the same bytes as the three, with one kernel
launch instead of three and a larger, more efficient GEMV. The model code calls
`q_proj`, `k_proj` and `v_proj` in turn on the same input, so the fused product
runs when `q_proj` is called and `k_proj` and `v_proj` hand out their parts of it.
Outputs are the same products (each output element is the same dot product).
"""

from __future__ import annotations

import torch
from torch import nn


class _FusedQKV(nn.Module):
    """The stacked projection; `q_proj` computes it, `k_proj` and `v_proj` read the parts it left."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        super().__init__()
        self.sizes = (q.out_features, k.out_features, v.out_features)
        self.weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]).detach(), requires_grad=False)
        biases = [layer.bias for layer in (q, k, v)]
        stacked = torch.cat(biases).detach() if all(b is not None for b in biases) else None
        self.bias = nn.Parameter(stacked, requires_grad=False) if stacked is not None else None
        self.parts: tuple[torch.Tensor, torch.Tensor] | None = None


class _Part(nn.Module):
    """One of q, k, v: the query part runs the fused product, the others return what it left."""

    def __init__(self, fused: _FusedQKV, index: int) -> None:
        super().__init__()
        self.index = index
        object.__setattr__(self, "fused", fused)  # shared, not a submodule of each part (its weight counts once)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        if self.index == 0:
            q, k, v = nn.functional.linear(hidden_states, fused.weight, fused.bias).split(fused.sizes, dim=-1)
            fused.parts = (k, v)
            return q
        return fused.parts[self.index - 1]


def fuse_qkv_projections(model: nn.Module) -> int:
    """Fuse q/k/v of every attention module that has `q_proj`, `k_proj`, `v_proj` Linear layers of one input
    size; return how many were fused. Done once, after loading and before decoding."""
    fused_count = 0
    for module in model.modules():
        layers = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(layer, nn.Linear) for layer in layers):
            continue
        if len({layer.in_features for layer in layers}) != 1:
            continue
        fused = _FusedQKV(*layers)
        module.qkv_fused = fused  # registered once, so the weight moves and counts with the model
        module.q_proj, module.k_proj, module.v_proj = (_Part(fused, index) for index in range(3))
        fused_count += 1
    return fused_count
