"""The gated activation of a Llama-family MLP, act(gate)·up, keeping less for backward.

Autograd on `F.silu(gate) * up` keeps three (tokens × intermediate) tensors per layer for
backward: gate (for SiLU's gradient), silu(gate) and up (for the product's). `silu_mul` keeps
gate and up only and recomputes silu(gate) in backward: on the quickstart model that is about
100 MB less at the update's peak, a quarter of the MLP's activations, for one more SiLU per
layer. Values and gradients are bit-identical to autograd's (same kernels, same order).

The down projection's adapter keeps a fourth, its input act(gate)·up (for the gradient of its A
matrix). `down_of_gated` has autograd recompute that input from gate and up, which stay anyway,
when backward needs it: 100–150 MiB less at the peak of the benchmarks' training step, for one
more act(gate)·up per layer in backward (the update took no longer). The recomputed input is the
same bits as the one the forward used, so the gradients are unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _SiluMul(torch.autograd.Function):
    """silu(gate)·up, saving gate and up for backward (not silu(gate))."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:  # what autograd computes: silu'(gate)·(grad·up)
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up elementwise (silu(x) = x·sigmoid(x)), e.g. silu(1)·2 = 2/(1 + e⁻¹) ≈ 1.4621.

    With gradients recorded, backward keeps gate and up only; without, one buffer is allocated.
    """
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMul.apply(gate, up)
    return F.silu(gate).mul_(up)


def is_silu(act_fn) -> bool:
    """True when the module `act_fn` computes F.silu: torch's SiLU or transformers' SiLUActivation."""
    return isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def gated_activation(act_fn, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act_fn(gate)·up, the input of a gated MLP's down projection (`silu_mul` when act_fn is SiLU
    and gate and up share a dtype, as a projection's outputs do)."""
    return silu_mul(gate, up) if is_silu(act_fn) and gate.dtype == up.dtype else act_fn(gate) * up


@contextmanager
def recomputed_when_saved(tensor: torch.Tensor, recompute):
    """Within the block, autograd keeps, in place of `tensor` (or a view of it) saved for
    backward, only the way to make it again: `recompute()`, called without gradients during
    backward, must return a tensor equal to `tensor` (same shape, contiguous)."""
    memory = tensor.untyped_storage().data_ptr()  # not the storage itself: holding it would keep it

    def pack(saved: torch.Tensor):
        if saved.untyped_storage().data_ptr() != memory:
            return saved
        return recompute, saved.size(), saved.stride(), saved.storage_offset()

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        make, size, stride, offset = packed
        with torch.no_grad():
            return make().as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def down_of_gated(project, act_fn, gate: torch.Tensor, up: torch.Tensor):
    """project(act_fn(gate)·up), e.g. a gated MLP's down projection, without keeping its input
    act_fn(gate)·up for backward: it is recomputed from gate and up when needed."""
    activation = gated_activation(act_fn, gate, up)
    if not (torch.is_grad_enabled() and activation.requires_grad):
        return project(activation)
    with recomputed_when_saved(activation, lambda: gated_activation(act_fn, gate, up)):
        return project(activation)
