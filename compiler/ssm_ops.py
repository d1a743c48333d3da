"""llmc ops of state-space models (Mamba): the causal depthwise convolution with its state, and the
selective scan with its recurrent state (DESIGN.md, "llmc ops"; registered by compiler/ops.py).

Layouts: activations [batch, seq, channels] like every llmc op; the convolution state
[batch, channels, kernel - 1] (the last inputs the next step's convolution reads) and the SSM state
[batch, channels, state_size].

The selective scan has two forms. Its reference (the op's own implementation, what PyTorch runs)
is the recurrence itself, one position after another: h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·u_t,
y_t = C_t·h_t + D·u_t, gated by silu(z_t). A static graph cannot loop over a dynamic number of
positions, so targets get `selective_scan_steps`: the same recurrence as a scan of log2(SCAN_TOKENS)
doubling steps (Hillis-Steele), exact for up to SCAN_TOKENS positions per call; the runtime feeds
longer prompts in chunks of that many, carrying the state (the contract's `step_tokens`). A decode
step (one position) reduces to the recurrence; every factor exp(Δ·A) is at most 1, so the scan
neither overflows nor needs the segment sums a quadratic (attention-like) form would hold for every
pair of positions and every state channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Positions one call of a traced recurrent graph takes: the scan decomposition runs
# log2(SCAN_TOKENS) doubling steps whatever the call's length, so a larger chunk makes every
# decode step pay for more steps. 64: six steps.
SCAN_TOKENS = 64
_SCAN_STEPS = SCAN_TOKENS.bit_length() - 1


def causal_conv1d_ref(
    x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution continuing from `state`.

    x [B, S, C]; state [B, C, K-1] (the previous K-1 inputs, zeros at the start); weight [C, K];
    bias [C] or None -> (y [B, S, C] before any activation, new state [B, C, K-1])."""
    width = weight.shape[1] - 1
    full = torch.cat((state, x.transpose(1, 2)), dim=2)  # [B, C, K-1+S]
    y = F.conv1d(full, weight.unsqueeze(1), bias, groups=weight.shape[0])  # [B, C, S]
    return y.transpose(1, 2), full[:, :, full.shape[2] - width :].clone()


def _per_channel(x: Tensor) -> Tensor:
    """B or C as [B, S, 1 or D, N]: one for every channel, or each channel's own."""
    return x.unsqueeze(2) if x.dim() == 3 else x


def causal_conv1d_taps(
    x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """causal_conv1d_ref as one multiply-add per kernel tap, no convolution op (TensorRT's ONNX
    parser takes 2D and 3D convolutions only)."""
    width = weight.shape[1] - 1
    full = torch.cat((state, x.transpose(1, 2)), dim=2)  # [B, C, K-1+S]
    s = x.shape[1]
    y = sum(full[:, :, k : k + s] * weight[:, k : k + 1] for k in range(width + 1))
    if bias is not None:
        y = y + bias.unsqueeze(-1)
    return y.transpose(1, 2), full[:, :, full.shape[2] - width :].clone()


def _discretize(u, delta, A, B):
    """exp(Δ·A) and Δ·B·u per position and channel: [B, S, D, N] each."""
    decay = torch.exp(delta.unsqueeze(-1) * A)
    inject = (delta * u).unsqueeze(-1) * _per_channel(B)
    return decay, inject


def _readout(h, u, C, D, z):
    """y = C·h + D·u, gated by silu(z): h [B, S, D, N] -> [B, S, D]."""
    y = (h * _per_channel(C)).sum(-1) + u * D
    return y * F.silu(z) if z is not None else y


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor | None,
    state: Tensor,
) -> tuple[Tensor, Tensor]:
    """Mamba's selective scan continuing from `state`, one position after another.

    u, delta (Δ, after softplus), z [B, S, D] (z may be None: no gate); A [D, N] (negative);
    B, C [B, S, N] (shared by every channel) or [B, S, D, N] (Mamba2's groups, spread over their
    channels); D [D]; state [B, D, N] -> (y [B, S, D], the state after the last position)."""
    decay, inject = _discretize(u, delta, A, B)
    h, states = state, []
    for t in range(u.shape[1]):
        h = decay[:, t] * h + inject[:, t]
        states.append(h)
    return _readout(torch.stack(states, 1), u, C, D, z), h


def _shift(x: Tensor, by: int, fill: float) -> Tensor:
    """x [B, S, ...] moved `by` positions later along S, the first `by` filled with `fill`
    (all of it when S <= by)."""
    pad = x.new_full((x.shape[0], by, *x.shape[2:]), fill)
    return torch.cat((pad, x), dim=1)[:, : x.shape[1]]


def selective_scan_steps(u, delta, A, B, C, D, z, state):
    """selective_scan_ref for calls of at most SCAN_TOKENS positions, with no loop over them:
    after doubling step k, (decay_t, inject_t) compose the last 2^(k+1) positions ending at t."""
    decay, inject = _discretize(u, delta, A, B)
    s = u.shape[1]
    steps = (s - 1).bit_length() if isinstance(s, int) else _SCAN_STEPS  # static: what it needs
    for k in range(steps):
        inject = decay * _shift(inject, 1 << k, 0.0) + inject
        decay = decay * _shift(decay, 1 << k, 1.0)
    h = decay * state.unsqueeze(1) + inject  # [B, S, D, N]: every position's state
    # the last position's state by its index (TVM's importer mis-reads a negative one)
    return _readout(h, u, C, D, z), h.select(1, h.shape[1] - 1)


causal_conv1d = torch.library.custom_op("llmc::causal_conv1d", mutates_args=())(causal_conv1d_ref)
selective_scan = torch.library.custom_op("llmc::selective_scan", mutates_args=())(
    selective_scan_ref
)


@causal_conv1d.register_fake
def _(x, state, weight, bias):
    return torch.empty_like(x), torch.empty_like(state)


@selective_scan.register_fake
def _(u, delta, A, B, C, D, z, state):
    return torch.empty_like(u), torch.empty_like(state)


# What a target runs in place of each op when it has no kernel of its own (compiler/ops.py).
DECOMPOSITIONS = {
    torch.ops.llmc.causal_conv1d.default: causal_conv1d_ref,
    torch.ops.llmc.selective_scan.default: selective_scan_steps,
}
