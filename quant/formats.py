"""Grouped 4-bit and per-channel 8-bit weight quantization, and the packed layouts on disk.

4-bit: asymmetric, groups of `group_size` along the input dimension, a 16-bit scale and zero per
group. A weight is `(code - 8) * scale + zero` with codes 0..15: `zero` is the value of the middle
code, the form PyTorch's int4 kernels take, so the stored tensors feed them without conversion.
Bits per weight: 4 + 32 / group_size (4.5 at group 64).

8-bit: symmetric per output channel, `code * scale` with codes -127..127 (8 + 16 / in_features
bits per weight).

Three ways to choose scale and zero, none needing calibration data:
- "rtn": round to nearest over each group's min..max.
- "mse": per group, a search over clipping ranges, each refined by alternating least squares
  (codes, then the scale and zero that best fit them), keeping whatever gives the smallest
  squared error after rounding scale and zero to 16 bits. Lowest Frobenius error of the three.
- "wmse" (default): the same search on the squared error weighted by each weight's magnitude.
  A trained network's large weights carry more of its output than their share of the
  Frobenius error says: plain "mse" trades them for the many small ones, and on nano it
  drifts from the unquantized model's predictions only a little less than "rtn", for all its
  lower weight error. Weighting by |w| keeps most of the error reduction (still below HQQ's
  on MiniLM) and gives the smallest KL divergence of the three at every group size
  (benchmarks/bench_quant.py, benchmarks/bench_nano.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels import cpu_kernels

METHODS = ("wmse", "mse", "rtn")
DEFAULT_METHOD = "wmse"
GROUP_SIZES = (32, 64, 128)
TILE_ROWS = 32  # the CPU int4 kernel interleaves rows in blocks of 32
PARAM_DTYPE = torch.bfloat16  # scales and zeros, as the int4 kernels take them
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
LSQ_STEPS = 3
# Groups quantized at a time. The fit makes dozens of passes over its temporaries; kept to a few
# MB they stay in cache, where a Mixtral expert (14336x4096) fitted whole ran several times slower.
FIT_CHUNK = 16384


class QuantError(ValueError):
    """A tensor or setting the quantizer cannot handle."""


@dataclass
class QuantizedTensor:
    """A quantized weight matrix (out_features, in_features) and what dequantizes it.

    bits 4: `qweight` uint8 (out, in/2) in the CPU int4 kernel's tiled layout, `scales_zeros`
    (in/group, out, 2) bfloat16. bits 8: `qweight` int8 (out, in), `scales_zeros` (out,) bf16.
    """

    qweight: torch.Tensor
    scales_zeros: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    bits: int
    group_size: int  # 0 for per-channel
    method: str
    error: float | None = None  # relative Frobenius error, when measured at quantize time

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales_zeros.nbytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The weight these codes stand for, in the original shape and dtype."""
        if self.bits == 8:
            w = self.qweight.float() * self.scales_zeros.float()[:, None]
            return w.to(self.dtype)
        codes = unpack_int4(self.qweight).float()  # (out, in)
        n, k = self.shape
        scale = self.scales_zeros[..., 0].float().t()  # (out, groups)
        zero = self.scales_zeros[..., 1].float().t()
        w = (codes.view(n, -1, self.group_size) - 8) * scale[..., None] + zero[..., None]
        return w.reshape(n, k).to(self.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in 0..15 -> uint8 (out, in/2) in the CPU int4 kernel's layout.

    Rows go in blocks of 32; in a block, byte (k, i) holds row i's code for column k in its low
    nibble and row i+16's in its high nibble (what `_convert_weight_to_int4pack_for_cpu` writes).
    """
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // TILE_ROWS, 2, TILE_ROWS // 2, k)
    packed = c[:, 0] | (c[:, 1] << 4)  # (blocks, 16, in)
    return packed.transpose(1, 2).contiguous().view(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 (out, in/2) -> uint8 codes (out, in)."""
    n, half = packed.shape
    k = 2 * half
    p = packed.view(n // TILE_ROWS, k, TILE_ROWS // 2).transpose(1, 2)  # (blocks, 16, in)
    codes = torch.stack([p & 15, p >> 4], dim=1)  # (blocks, 2, 16, in)
    return codes.reshape(n, k)


def _round_params(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale.to(PARAM_DTYPE).float(), zero.to(PARAM_DTYPE).float()


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round((w - zero) / scale) + 8, 0, 15)


def _minmax_params(w: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2 * clip
    scale = torch.clamp(2 * half / 15, min=1e-10)
    zero = mid - half + 8 * scale
    return scale, zero


def _refit(
    w: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares scale and zero for fixed codes: w ~ (codes - 8) * scale + zero."""
    x = codes - 8
    total = weight.sum(-1, keepdim=True).clamp(min=1e-30)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return (weight * t).sum(-1, keepdim=True) / total

    xm, wm = mean(x), mean(w)
    var, cov = mean((x - xm) ** 2), mean((x - xm) * (w - wm))
    scale = torch.where(var > 0, cov / var.clamp(min=1e-12), torch.ones_like(var))
    scale = torch.clamp(scale, min=1e-10)
    return scale, wm - scale * xm


def _fit_groups(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (groups, 1) for float32 groups (groups, group_size)."""
    if method == "rtn":
        return _round_params(*_minmax_params(w, 1.0))
    kernels = cpu_kernels()
    if kernels is not None and w.device.type == "cpu":  # the same fit in C++, ~7x faster
        scale, zero = kernels.fit_groups(
            w.contiguous(), method == "wmse", list(CLIP_GRID), LSQ_STEPS
        )
        return scale, zero
    weight = w.abs() if method == "wmse" else torch.ones_like(w)  # (groups, group_size)
    best_err = best_scale = best_zero = None
    for clip in CLIP_GRID:
        scale, zero = _minmax_params(w, clip)
        for _ in range(LSQ_STEPS):
            scale, zero = _refit(w, _codes(w, scale, zero), weight)
        scale, zero = _round_params(scale, zero)
        err = (weight * ((_codes(w, scale, zero) - 8) * scale + zero - w) ** 2).sum(
            -1, keepdim=True
        )
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_tensor(
    w: torch.Tensor, bits: int = 4, group_size: int = 64, method: str = DEFAULT_METHOD
) -> QuantizedTensor:
    """Quantize a 2-D weight (out_features, in_features).

    bits=4: grouped along in_features (`group_size` 32, 64 or 128); out_features must be a
    multiple of 32. bits=8: per output channel (`group_size` is ignored).
    """
    if w.ndim != 2:
        raise QuantError(f"can only quantize 2-D weights, got shape {list(w.shape)}")
    if method not in METHODS:
        raise QuantError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    n, k = w.shape
    if bits == 8:
        wf = w.detach().float()
        scale = (wf.abs().amax(-1) / 127).clamp(min=1e-10).to(PARAM_DTYPE)
        codes = torch.clamp(torch.round(wf / scale.float()[:, None]), -127, 127)
        diff = torch.linalg.norm(codes * scale.float()[:, None] - wf)
        error = float(diff / torch.linalg.norm(wf).clamp(min=1e-30))
        return QuantizedTensor(codes.to(torch.int8), scale, (n, k), w.dtype, 8, 0, "rtn", error)
    if bits != 4:
        raise QuantError(f"bits must be 4 or 8, not {bits}")
    if group_size not in GROUP_SIZES:
        raise QuantError(f"group size must be one of {GROUP_SIZES}, not {group_size}")
    if k % group_size or n % TILE_ROWS:
        raise QuantError(
            f"shape {list(w.shape)}: in_features must be a multiple of the group size "
            f"({group_size}) and out_features of {TILE_ROWS}"
        )
    # In chunks of whole 32-row tiles, about FIT_CHUNK groups each: the fit's temporaries stay
    # in cache, and a large tensor is never held in float32 whole.
    rows = max(TILE_ROWS, FIT_CHUNK * group_size // k // TILE_ROWS * TILE_ROWS)
    packed, params, err2, norm2 = [], [], 0.0, 0.0
    for r in range(0, n, rows):
        chunk = w[r : r + rows].detach().float()
        m = chunk.shape[0]
        groups = chunk.reshape(m * k // group_size, group_size)
        scale, zero = _fit_groups(groups, method)  # (groups, 1) each
        codes = _codes(groups, scale, zero)
        err2 += float((((codes - 8) * scale + zero - groups) ** 2).sum())
        norm2 += float((groups**2).sum())
        packed.append(pack_int4(codes.to(torch.uint8).view(m, k)))
        params.append(torch.stack([scale.view(m, -1).t(), zero.view(m, -1).t()], dim=-1))
    scales_zeros = torch.cat(params, dim=1).to(PARAM_DTYPE)  # (groups per row, out, 2)
    error = math.sqrt(err2 / max(norm2, 1e-60))
    return QuantizedTensor(
        torch.cat(packed), scales_zeros.contiguous(), (n, k), w.dtype, 4, group_size, method, error
    )


def relative_error(w: torch.Tensor, q: QuantizedTensor) -> float:
    """||W - deq(q(W))||_F / ||W||_F."""
    wf = w.float()
    return float(
        torch.linalg.norm(wf - q.dequantize().float()) / torch.linalg.norm(wf).clamp(min=1e-30)
    )
