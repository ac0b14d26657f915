"""Gated MLPs that keep less for backward: `GatedDown` rebuilds act(gate) * up there."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    pass

# forward = down_proj(act_fn(gate_proj(x)) * up_proj(x)) (SiLU, or GELU-tanh in the Gemmas)
GATED_MLPS = (
    "LlamaMLP",
    "Qwen2MLP",
    "Qwen3MLP",
    "MistralMLP",
    "GemmaMLP",
    "Gemma2MLP",
    "Gemma3MLP",
    "Olmo2MLP",
    "GraniteMLP",
    "SmolLM3MLP",
)
# forward: gate, up = gate_up_proj(x).chunk(2); down_proj(up * activation_fn(gate))
FUSED_GATED_MLPS = ("Phi3MLP",)


class GatedDown(torch.autograd.Function):
    """down_proj(act(gate) * up) that keeps only gate and up for backward.

    Backward rebuilds h = act(gate) * up (elementwise) for down_proj's weight gradient and act's own
    backward; down_proj's product is not rerun, as a checkpointed MLP would. Under autocast the
    products run in the forward output's dtype, as autocast's linear does.
    gate, up [..., I]; weight [H, I]; bias [H] or None; returns [..., H].
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, act_fn):
        out = F.linear(act_fn(gate) * up, weight, bias)
        ctx.save_for_backward(gate, up, weight)
        ctx.act_fn, ctx.has_bias, ctx.compute_dtype = act_fn, bias is not None, out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        with torch.enable_grad():
            gate_, up_ = gate.detach().requires_grad_(), up.detach().requires_grad_()
            h = ctx.act_fn(gate_) * up_
        dt, needs = ctx.compute_dtype, ctx.needs_input_grad
        grad_out = grad_out.to(dt)
        rows_out = grad_out.flatten(0, -2)
        grad_weight = (rows_out.T @ h.detach().to(dt).flatten(0, -2)).to(weight.dtype) if needs[2] else None
        grad_bias = rows_out.sum(0).to(weight.dtype) if ctx.has_bias and needs[3] else None
        grad_gate = grad_up = None
        if needs[0] or needs[1]:
            grad_h = (grad_out @ weight.to(dt)).to(h.dtype)
            grad_gate, grad_up = torch.autograd.grad(h, (gate_, up_), grad_h)
        return grad_gate, grad_up, grad_weight, grad_bias, None


def _recomputing_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's own ops in its order; act(gate) * up is rebuilt in backward, not kept."""
    down = mlp.down_proj
    return GatedDown.apply(mlp.gate_proj(x), mlp.up_proj(x), down.weight, down.bias, mlp.act_fn)


def _recomputing_fused_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP (one gate_up_proj product, split in halves) with act(gate) * up rebuilt in backward."""
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    down = mlp.down_proj
    return GatedDown.apply(gate, up, down.weight, down.bias, mlp.activation_fn)


@contextlib.contextmanager
def recompute_gated_mlps(decoder: nn.Module):
    """Gated MLPs keep gate and up only for backward while the context is open (hooks on a module,
    such as the last-layer skip, still run around it). Other MLP classes are left as they are, and so
    is an MLP whose forward is already replaced on the instance (accelerate's offloading hooks)."""
    forwards = dict.fromkeys(GATED_MLPS, _recomputing_forward)
    forwards.update(dict.fromkeys(FUSED_GATED_MLPS, _recomputing_fused_forward))
    mlps = [
        m
        for m in decoder.modules()
        if type(m).__name__ in forwards and "forward" not in vars(m) and type(m.down_proj) is nn.Linear
    ]
    for mlp in mlps:
        mlp.forward = functools.partial(forwards[type(mlp).__name__], mlp)
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward  # back to the class's forward
