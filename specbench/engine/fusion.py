"""Load-time fusion of the projections that read one input into one matrix product.

GPT-J (and GPT-Neo, Llama-style models) project q, k and v with three matrices
of the same input. At batch size 1 a decode step is a chain of matrix-vector
products that stream weights from memory; one product over the stacked matrix
streams the same bytes with one kernel launch instead of three, and a larger
product wastes less of the GPU at its start and end. In a parallel block (GPT-J:
attention and MLP both read the output of one layer norm) the MLP's input
projection joins the stack: one product per layer instead of two (on an H200 at
one row, 56.3 us instead of 59.0 for GPT-J's shapes: `benchmarks/NOTES.md`).

The model code calls the projections in turn on the same input tensor (q, k, v,
then the MLP's), so the first part called with a new input runs the stacked
product and the others hand out their parts of it; the last part lets go of it,
so nothing outlives the forward. A part called with any other tensor (another
thread's forward, a projection fed something else) runs the product itself, so
outputs never come from another input. Outputs are the same dot products (to
float rounding: a larger product may sum in another order); a layer without a
bias gets zeros in the stacked bias.
"""

from __future__ import annotations

import torch
from torch import nn

# where a parallel block's MLP input projection sits, from the block holding the attention module, by model type
PARALLEL_MLP_INPUTS = {"gptj": ("mlp", "fc_in")}
QKV = ("q_proj", "k_proj", "v_proj")


class _StackedProjection(nn.Module):
    """The stacked weights, and the last product with the input it was computed from."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.sizes = tuple(layer.out_features for layer in layers)
        self.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]).detach(), requires_grad=False)
        self.bias = None
        if any(layer.bias is not None for layer in layers):
            zeros = [layer.weight.new_zeros(layer.out_features) for layer in layers]
            biases = [zero if layer.bias is None else layer.bias for layer, zero in zip(layers, zeros, strict=True)]
            self.bias = nn.Parameter(torch.cat(biases).detach(), requires_grad=False)
        # (input, parts of its product); replaced as a whole, so a thread never reads half of another's
        self.last: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None


class _Part(nn.Module):
    """One of the stacked projections: its part of the stacked product of its input."""

    def __init__(self, stacked: _StackedProjection, index: int) -> None:
        super().__init__()
        self.index = index
        object.__setattr__(self, "stacked", stacked)  # shared, not a submodule of each part (its weight counts once)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        stacked = self.stacked
        last = stacked.last
        if last is None or last[0] is not hidden_states:
            product = nn.functional.linear(hidden_states, stacked.weight, stacked.bias)
            last = stacked.last = (hidden_states, product.split(stacked.sizes, dim=-1))
        if self.index == len(stacked.sizes) - 1:
            stacked.last = None  # the last part read: the product is not kept past the forward
        return last[1][self.index]


def fuse_projections(model: nn.Module) -> int:
    """Stack q/k/v of every attention module that has `q_proj`, `k_proj`, `v_proj` Linear layers of one input
    size (with the MLP's input projection, in a parallel block); return how many stacks were made.

    Done once, after loading and before decoding.
    """
    mlp_input = PARALLEL_MLP_INPUTS.get(getattr(getattr(model, "config", None), "model_type", ""))
    # (block, attention module) pairs, collected first: the loop replaces their layers, and holding nothing
    # else lets each replaced layer go at once (a model that barely fits is not doubled while it is fused)
    attentions = [
        (block, child)
        for block in model.modules()
        for child in block.children()
        if all(isinstance(getattr(child, name, None), nn.Linear) for name in QKV)
    ]
    fused_count = 0
    for block, attention in attentions:
        owners = [(attention, name) for name in QKV]
        layers = [getattr(attention, name) for name in QKV]
        if mlp_input is not None:
            mlp = getattr(block, mlp_input[0], None)
            mlp_layer = getattr(mlp, mlp_input[1], None)
            if isinstance(mlp_layer, nn.Linear):
                owners.append((mlp, mlp_input[1]))
                layers.append(mlp_layer)
        if not _stackable(layers[:3]):
            continue
        if not _stackable(layers):  # e.g. a device_map that put the MLP on another device than the attention
            owners, layers = owners[:3], layers[:3]
        stacked = _StackedProjection(layers)
        attention.stacked_projection = stacked  # registered once, so the weight moves and counts with the model
        for index, (owner, name) in enumerate(owners):
            setattr(owner, name, _Part(stacked, index))
        fused_count += 1
    return fused_count


def _stackable(layers: list[nn.Linear]) -> bool:
    """One input size, one device and real weights (not offloaded to the meta device)."""
    devices = {layer.weight.device for layer in layers}
    return len({layer.in_features for layer in layers}) == 1 and len(devices) == 1 and devices != {torch.device("meta")}
