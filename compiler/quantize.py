"""Weight quantization algorithms on plain tensors (target-neutral; the quantize_weights pass
applies them to a graph's linear and embedding weights).

A quantized weight W [N, K] is stored as unsigned codes q in [0, 2^bits), one scale and one zero
point per group of `group` consecutive input channels of a row: W ≈ (q - zero) * scale. Zero points
are integers (onnxruntime's fast kernels take them as uint8), except where a group's weights
already lie exactly on an asymmetric grid of 2^bits levels (a GGUF Q4_1 source, for instance):
there the zero keeps its exact fractional value -min/scale, so the weights are reproduced without
re-quantization error. A symmetric grid has the fixed zero 2^(bits-1), codes in [0, 2^bits)
(int4: -8..7 steps) and a searched scale (`symmetric_scale`).

- `rtn`: round to nearest on a min/max (asymmetric) or searched symmetric grid.
- `gptq`: GPTQ (Frantar et al., 2022): quantize input channels one at a time and spread each
  one's rounding error over the channels not yet quantized, weighted by the inverse Hessian
  H = 2 XᵀX of the layer's calibration inputs X.
- `awq_scales`: AWQ (Lin et al., 2023): per-input-channel scales s = mean|x|^α, α searched on a
  grid, that minimize the output error of the quantized (W·s) applied to (x/s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc import quant_layout


@dataclass
class Quantized:
    """Codes [N, K] (uint8), scales and zeros [N, K/group] (float32), and the grid."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group: int
    sym: bool

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group)

    def packed(self) -> Tensor:
        """The codes in the llmc layout, [N, K*bits/8] uint8 (llmc.quant_layout)."""
        return torch.from_numpy(quant_layout.pack(self.codes.cpu().numpy(), self.bits))


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor | float, group: int) -> Tensor:
    """Codes [N, K], scales and zeros [N, K/group] (or one zero) -> W [N, K] in scales' dtype:
    the torch twin of `llmc.quant_layout.dequantize_codes` (the llmc ops trace this one)."""
    n, k = codes.shape
    q = codes.to(scales.dtype).view(n, k // group, group)
    zero = zeros.unsqueeze(-1) if isinstance(zeros, Tensor) else zeros
    return ((q - zero) * scales.unsqueeze(-1)).view(n, k)


# Multiples of the two natural scales of a symmetric grid that `symmetric_scale` tries.
SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8)


def symmetric_scale(w: Tensor, bits: int) -> Tensor:
    """The scale of each group [..., g] of a symmetric grid: of the multiples SEARCH of the
    largest magnitude over the top level (2^(bits-1) - 1 steps: the plain absmax grid) and over
    the bottom one (2^(bits-1) steps: the level the absmax grid never uses, which holds a
    negative extreme exactly), the one with the least squared error. The absmax grid comes first
    and keeps ties, so a group already on a symmetric grid (a GGUF Q8_0 source) stays exact.
    Scales stay positive (TensorRT's dequantization takes no other). On SmolLM2's projections
    (4 bits, groups of 32, round to nearest) the weights' squared error falls by 30%."""
    top = 2 ** (bits - 1) - 1
    largest = w.abs().amax(-1)
    best = best_error = None
    for base in (largest / top, largest / (top + 1)):
        for factor in SEARCH:
            scale = base * factor
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
            codes = torch.round(w / scale.unsqueeze(-1)).clamp(-top - 1, top)
            error = (codes * scale.unsqueeze(-1) - w).square().sum(-1)
            if best is None:
                best, best_error = scale, error
            else:
                better = error < best_error
                best = torch.where(better, scale, best)
                best_error = torch.where(better, error, best_error)
    return best


def grid(w: Tensor, bits: int, sym: bool, keep_grids: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and zero of each row of `w` [..., g] (last dim: one group): an integer zero, or
    with `keep_grids` the exact fractional one of a group already on an asymmetric grid."""
    if keep_grids and not sym:
        scale, zero = grid(w, bits, sym)
        exact_scale, exact_zero, _, on_grid = exact_grid(w.to(torch.float32), bits)
        return torch.where(on_grid, exact_scale, scale), torch.where(on_grid, exact_zero, zero)
    w = w.to(torch.float32)
    if sym:
        scale = symmetric_scale(w, bits)
        return scale, torch.full_like(scale, quant_layout.symmetric_zero(bits))
    top = 2**bits - 1
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # keep 0 exactly on the grid
    scale = (hi - lo) / top
    zero = torch.round(-lo / torch.where(scale > 0, scale, 1)).clamp(0, top)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes of `w` [..., g] on the grid (scale, zero) [...]."""
    q = torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1))  # zero may be fractional
    return q.clamp(0, 2**bits - 1)


def rtn(w: Tensor, bits: int, group: int, sym: bool, keep_grids: bool = True) -> Quantized:
    """Round-to-nearest, group-wise. `keep_grids`: groups already on an asymmetric grid of
    2^bits levels keep it exactly (a fractional zero point)."""
    n, k = w.shape
    wg = w.detach().to(torch.float32).view(n, k // group, group)
    scale, zero = grid(wg, bits, sym, keep_grids)
    codes = quantize_codes(wg, scale, zero, bits)
    return Quantized(codes.view(n, k).to(torch.uint8), scale, zero, bits, group, sym)


def exact_grid(wg: Tensor, bits: int, tol: float = 1e-3):
    """The min/max grid of each group [..., g] with its fractional zero, and whether every
    weight of the group is on it (within `tol` of a step)."""
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 2**bits - 1)
    zero = -lo / scale
    back = (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    on_grid = ((back - wg).abs() <= tol * scale.unsqueeze(-1)).all(-1)
    return scale, zero, codes, on_grid


def gptq(
    w: Tensor,
    hessian: Tensor,
    bits: int,
    group: int,
    sym: bool,
    damp: float = 0.01,
    block: int = 128,
    keep_grids: bool = True,
) -> Quantized:
    """GPTQ with group-wise grids (each group's grid is set from the error-updated weights when
    the group's first channel is reached, keeping an exact grid as `rtn` does, so weights already
    on one are reproduced with no error to spread), lazy block updates and dampening
    `damp`·mean(diag H)."""
    n, k = w.shape
    block = max(group, block // group * group)  # whole groups per block
    w = w.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0  # channels no calibration token used
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(k, dtype=h.dtype) * damp * torch.mean(torch.diag(h))
    # upper Cholesky factor of H^-1: row i holds the update weights for channels after i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.float64)
    scales = torch.zeros(n, k // group, dtype=torch.float64)
    zeros = torch.zeros(n, k // group, dtype=torch.float64)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb = w[:, start:end].clone()
        errors = torch.zeros_like(wb)
        hb = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group == 0:  # the group's grid, from its error-updated weights
                s, z = grid(wb[:, i : i + group], bits, sym, keep_grids)
                scales[:, col // group], zeros[:, col // group] = s, z
            s, z = scales[:, col // group], zeros[:, col // group]
            q = torch.clamp(torch.round(wb[:, i] / s + z), 0, 2**bits - 1)
            codes[:, col] = q
            err = (wb[:, i] - (q - z) * s) / hb[i, i]
            wb[:, i:] -= err.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return Quantized(
        codes.to(torch.uint8), scales.to(torch.float32), zeros.to(torch.float32), bits, group, sym
    )


def output_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """Relative output error ‖X(W-Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs behind H = 2XᵀX."""
    d = (w - w_hat).to(torch.float64)
    w64, h = w.to(torch.float64), hessian.to(torch.float64)
    num = torch.einsum("nk,kl,nl->", d, h, d)
    den = torch.einsum("nk,kl,nl->", w64, h, w64)
    return float(num / den) if den > 0 else 0.0


def awq_scales(
    weights: list[Tensor],
    x: Tensor,
    bits: int,
    group: int,
    sym: bool,
    grid_points: int = 20,
) -> tuple[Tensor, float]:
    """The per-input-channel scale s [K] shared by `weights` (each [N_i, K], all reading the
    activations x [T, K]) that minimizes Σ‖x Wᵀ − (x/s) Q(W·s)ᵀ‖², searching s = mean|x|^α for α
    in [0, 1); α = 0 (no scaling, plain RTN) is a candidate, so the result is never worse on x.
    Returns (s, best α)."""
    x = x.to(torch.float32)
    mean_abs = x.abs().mean(0).clamp(min=1e-8)
    reference = [x @ w.T for w in weights]
    best, best_alpha, best_scale = float("inf"), 0.0, torch.ones_like(mean_abs)
    for step in range(grid_points):
        alpha = step / grid_points
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
        loss = 0.0
        for w, ref in zip(weights, reference, strict=True):
            w_hat = rtn(w * s, bits, group, sym).dequantize() / s
            loss += float(((x @ w_hat.T) - ref).pow(2).mean())
        if loss < best:
            best, best_alpha, best_scale = loss, alpha, s
    return best_scale, best_alpha
