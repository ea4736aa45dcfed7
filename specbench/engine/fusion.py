"""Load-time fusion of the projections that read one input into one matrix product.

GPT-J (and GPT-Neo, Llama-style models) project q, k and v with three matrices
of the same input. At batch size 1 a decode step is a chain of matrix-vector
products that stream weights from memory; one product over the stacked matrix
streams the same bytes with one kernel launch instead of three, and a larger
product wastes less of the GPU at its start and end. In a parallel block (GPT-J:
attention and MLP both read the output of one layer norm) the MLP's input
projection joins the stack: one product per layer instead of two (on an H200 at
one row, 57.7 us instead of 62.7 for GPT-J's shapes).

The model code calls the projections in turn on the same input (q, k, v, then
the MLP's), so the stacked product runs when the first one is called and the
others hand out their parts of it. Outputs are the same dot products (to float
rounding: a larger product may sum in another order); a layer without a bias
gets zeros in the stacked bias.
"""

from __future__ import annotations

import torch
from torch import nn

# where a parallel block's MLP input projection sits, from the block holding the attention module, by model type
PARALLEL_MLP_INPUTS = {"gptj": ("mlp", "fc_in")}


class _StackedProjection(nn.Module):
    """The stacked weights; the first part called computes every projection, the others read theirs."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.sizes = tuple(layer.out_features for layer in layers)
        self.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]).detach(), requires_grad=False)
        self.bias = None
        if any(layer.bias is not None for layer in layers):
            zeros = [layer.weight.new_zeros(layer.out_features) for layer in layers]
            biases = [zero if layer.bias is None else layer.bias for layer, zero in zip(layers, zeros, strict=True)]
            self.bias = nn.Parameter(torch.cat(biases).detach(), requires_grad=False)
        self.outputs: tuple[torch.Tensor, ...] = ()


class _Part(nn.Module):
    """One of the stacked projections: the first runs the product, the others return what it left."""

    def __init__(self, stacked: _StackedProjection, index: int) -> None:
        super().__init__()
        self.index = index
        object.__setattr__(self, "stacked", stacked)  # shared, not a submodule of each part (its weight counts once)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        stacked = self.stacked
        if self.index == 0:
            product = nn.functional.linear(hidden_states, stacked.weight, stacked.bias)
            stacked.outputs = product.split(stacked.sizes, dim=-1)
        return stacked.outputs[self.index]


def fuse_projections(model: nn.Module) -> int:
    """Stack q/k/v of every attention module that has `q_proj`, `k_proj`, `v_proj` Linear layers of one input
    size (with the MLP's input projection, in a parallel block); return how many stacks were made.

    Done once, after loading and before decoding.
    """
    mlp_input = PARALLEL_MLP_INPUTS.get(getattr(getattr(model, "config", None), "model_type", ""))
    parents = {child: module for module in model.modules() for child in module.children()}
    fused_count = 0
    for module in list(model.modules()):
        owners = [(module, name) for name in ("q_proj", "k_proj", "v_proj")]
        layers = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(layer, nn.Linear) for layer in layers):
            continue
        if len({layer.in_features for layer in layers}) != 1:
            continue
        if mlp_input is not None and module in parents:
            mlp = getattr(parents[module], mlp_input[0], None)
            mlp_layer = getattr(mlp, mlp_input[1], None)
            if isinstance(mlp_layer, nn.Linear) and mlp_layer.in_features == layers[0].in_features:
                owners.append((mlp, mlp_input[1]))
                layers.append(mlp_layer)
        stacked = _StackedProjection(layers)
        module.stacked_projection = stacked  # registered once, so the weight moves and counts with the model
        for index, (owner, name) in enumerate(owners):
            setattr(owner, name, _Part(stacked, index))
        fused_count += 1
    return fused_count
