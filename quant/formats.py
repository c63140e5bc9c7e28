"""Grouped 4-bit and per-channel 8-bit weight quantization, and localmix's layout on disk.

4-bit: asymmetric, groups of `group_size` along the input dimension, a 16-bit scale and zero per
group. A weight is `(code - 8) * scale + zero` with codes 0..15: `zero` is the value of the middle
code. Bits per weight: 4 + 32 / group_size (4.5 at group 64).

8-bit: symmetric per output channel, `code * scale` with codes -127..127 (8 + 16 / in_features
bits per weight).

The stored layout (format version 2) is localmix's own and the same on every machine: it does
not depend on the CPU, the PyTorch version or the build. A kernel that wants another layout
(PyTorch's CPU int4 kernel packs differently on AVX2 and AVX-512 CPUs, its CUDA kernel
differently again) gets it at load, in memory, from that kernel's own packing function
(`quant.linear`); bytes on disk are never fed to such a kernel.

- Padding: a weight (out, in) is stored as (out_p, in_p): out_p rounds `out` up to a multiple
  of 32 rows; in_p rounds `in` up to a multiple of the group size (4-bit) or of 32 (8-bit).
  Padded rows dequantize to exactly 0 (4-bit: code 8, scale and zero 0; 8-bit: code and scale
  0); padded 4-bit columns repeat the row's last weight (so the group's range is its own) and
  padded 8-bit columns are 0. Products pad the activation with zeros, so padding adds nothing
  to a result. The logical shape travels beside the tensors (`QuantizedTensor.shape`, and the
  metadata of the shard that holds them). Any shape can be quantized.
- 4-bit `qweight`: uint8 (out_p, in_p / 2). Rows go in tiles of 32; tile t is in_p columns of
  16 bytes each, and byte (t, k, i) holds row 32t+i's code for column k in its low nibble and
  row 32t+i+16's in its high nibble. The 32 codes of one column of a tile are 16 adjacent bytes,
  what a SIMD register unpacks in one go (`pack_int4`, `unpack_int4`).
- 4-bit `scales_zeros`: bfloat16 (in_p / group_size, out_p, 2), scale then zero.
- 8-bit `qweight`: int8 (out_p, in_p) row-major; `scales_zeros`: bfloat16 (out_p,).

Three ways to choose scale and zero, none needing calibration data:
- "rtn": round to nearest over each group's min..max.
- "mse": per group, a search over clipping ranges, each refined by alternating least squares
  (codes, then the scale and zero that best fit them), keeping whatever gives the smallest
  squared error after rounding scale and zero to 16 bits. Lowest Frobenius error of the three.
- "wmse" (default): the same search on the squared error weighted by each weight's magnitude.
  A trained network's large weights carry more of its output than their share of the
  Frobenius error says: plain "mse" trades them for the many small ones. Weighting by |w| keeps
  most of the error reduction and drifts least from the unquantized model's predictions
  (benchmarks/bench_quant.py, benchmarks/bench_nano.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import QuantError
from .kernels import cpu_kernels
from .manifest import DEFAULT_METHOD, GROUP_SIZES, METHODS

TILE_ROWS = 32  # stored rows come in tiles of 32 (see the module docstring)
INT8_COLUMNS = 32  # 8-bit rows are padded to a multiple of 32 columns
PARAM_DTYPE = torch.bfloat16  # scales and zeros
DEQUANT_ROWS = 512  # rows dequantized at a time (a multiple of TILE_ROWS)
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
LSQ_STEPS = 3
# Groups quantized at a time. The fit makes dozens of passes over its temporaries; kept to a few
# MB they stay in cache, where a Mixtral expert (14336x4096) fitted whole ran slower.
FIT_CHUNK = 16384


@dataclass
class QuantizedTensor:
    """A quantized weight matrix of logical shape `shape` (out, in) and what dequantizes it.

    The tensors are stored padded to `padded_shape(*shape, bits, group_size)`, in the layout the
    module docstring describes: bits 4, `qweight` uint8 (out_p, in_p/2) and `scales_zeros`
    (in_p/group, out_p, 2) bfloat16; bits 8, `qweight` int8 (out_p, in_p) and `scales_zeros`
    (out_p,) bfloat16.
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
        """The weight these codes stand for, in the logical shape and the original dtype.

        Works through DEQUANT_ROWS rows at a time, so the float32 scratch stays small beside
        the result (on a GPU it comes out of the memory the plan reserves).
        """
        n, k = self.shape
        out = torch.empty(n, k, dtype=self.dtype, device=self.qweight.device)
        stored = self.qweight.shape[0]
        for r in range(0, n, DEQUANT_ROWS):
            m = min(DEQUANT_ROWS, n - r)
            rows = self._dequantize_rows(r, min(DEQUANT_ROWS, stored - r))
            out.narrow(0, r, m).copy_(rows.narrow(0, 0, m).narrow(1, 0, k))
        return out

    def _dequantize_rows(self, start: int, count: int) -> torch.Tensor:
        """Float32 (count, in_p) of `count` stored rows from `start` (a multiple of 32)."""
        q = self.qweight.narrow(0, start, count)
        sz = self.scales_zeros.narrow(-2 if self.bits == 4 else 0, start, count)
        if self.bits == 8:
            return q.float() * sz.float().unsqueeze(1)
        codes = unpack_int4(q).float()  # (count, in_p)
        scale = sz.select(-1, 0).float().t()  # (count, groups)
        zero = sz.select(-1, 1).float().t()
        w = (codes.view(count, -1, self.group_size) - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return w.view(count, -1)


def padded_shape(
    out_features: int, in_features: int, bits: int, group_size: int
) -> tuple[int, int]:
    """The stored (rows, columns) of a weight of logical shape (out_features, in_features)."""
    columns = group_size if bits == 4 else INT8_COLUMNS
    return _round_up(out_features, TILE_ROWS), _round_up(in_features, columns)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in 0..15, out a multiple of 32 -> uint8 (out, in/2) in localmix's layout.

    Rows go in tiles of 32; in a tile, byte (k, i) holds row i's code for column k in its low
    nibble and row i+16's in its high nibble.
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


def round_params(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero as stored (rounded to the stored dtype), back in float32."""
    return scale.to(PARAM_DTYPE).float(), zero.to(PARAM_DTYPE).float()


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes 0..15 (as floats) of groups `w` for their `scale` and `zero`."""
    return torch.clamp(torch.round((w - zero) / scale) + 8, 0, 15)


def minmax_params(w: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest's scale and zero for groups `w` (rows): their range, shrunk about its
    middle by `clip`, over the 16 codes."""
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


def fit_groups(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (groups, 1) for float32 groups (groups, group_size), fitted by `method`
    (see the module docstring), in localmix's C++ kernels where they run, else in PyTorch."""
    if method == "rtn":
        return round_params(*minmax_params(w, 1.0))
    kernels = cpu_kernels()
    if kernels is not None and w.device.type == "cpu":  # the same fit in C++, faster
        scale, zero = kernels.fit_groups(
            w.contiguous(), method == "wmse", list(CLIP_GRID), LSQ_STEPS
        )
        return scale, zero
    weight = w.abs() if method == "wmse" else torch.ones_like(w)  # (groups, group_size)
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # error, scale, zero
    for clip in CLIP_GRID:
        scale, zero = minmax_params(w, clip)
        for _ in range(LSQ_STEPS):
            scale, zero = _refit(w, int4_codes(w, scale, zero), weight)
        scale, zero = round_params(scale, zero)
        err = (weight * ((int4_codes(w, scale, zero) - 8) * scale + zero - w) ** 2).sum(
            -1, keepdim=True
        )
        if best is None:
            best = err, scale, zero
        else:
            better = err < best[0]
            best = (
                torch.where(better, err, best[0]),
                torch.where(better, scale, best[1]),
                torch.where(better, zero, best[2]),
            )
    assert best is not None  # CLIP_GRID is not empty
    return best[1], best[2]


def quantize_tensor(
    w: torch.Tensor, bits: int = 4, group_size: int = 64, method: str = DEFAULT_METHOD
) -> QuantizedTensor:
    """Quantize a 2-D weight (out_features, in_features) of any shape.

    bits=4: grouped along in_features (`group_size` 32, 64 or 128). bits=8: per output channel
    (`group_size` is ignored). The result is stored padded (see `padded_shape`).
    """
    if w.ndim != 2 or 0 in w.shape:
        raise QuantError(f"can only quantize non-empty 2-D weights, got shape {list(w.shape)}")
    if method not in METHODS:
        raise QuantError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    if bits == 8:
        return _quantize_int8(w)
    if bits != 4:
        raise QuantError(f"bits must be 4 or 8, not {bits}")
    if group_size not in GROUP_SIZES:
        raise QuantError(f"group size must be one of {GROUP_SIZES}, not {group_size}")
    n, k = w.shape
    n_p, k_p = padded_shape(n, k, 4, group_size)
    # In chunks of whole 32-row tiles, about FIT_CHUNK groups each: the fit's temporaries stay
    # in cache, and a large tensor is never held in float32 whole.
    rows = max(TILE_ROWS, FIT_CHUNK * group_size // k_p // TILE_ROWS * TILE_ROWS)
    packed, params, err2, norm2 = [], [], 0.0, 0.0
    for r in range(0, n_p, rows):
        m = min(rows, n_p - r)  # rows of this chunk, padding included (a multiple of 32)
        chunk = w[r : r + m].detach().float()
        real = chunk.shape[0]
        if k_p > k:  # each row's last value repeated: the fit's range stays the row's own
            chunk = torch.cat([chunk, chunk[:, -1:].expand(real, k_p - k)], dim=1)
        if m > real:
            chunk = torch.cat([chunk, chunk.new_zeros(m - real, k_p)])
        groups = chunk.view(m * k_p // group_size, group_size)
        scale, zero = fit_groups(groups, method)  # (groups, 1) each
        codes = int4_codes(groups, scale, zero)
        if m > real:  # padded rows: code 8 with scale and zero 0, exactly 0
            codes.view(m, k_p)[real:] = 8
            scale.view(m, -1)[real:] = 0
            zero.view(m, -1)[real:] = 0
        deq = ((codes - 8) * scale + zero).view(m, k_p)[:real, :k]
        err2 += float(((deq - chunk[:real, :k]) ** 2).sum())
        norm2 += float((chunk[:real, :k] ** 2).sum())
        packed.append(pack_int4(codes.to(torch.uint8).view(m, k_p)))
        params.append(torch.stack([scale.view(m, -1).t(), zero.view(m, -1).t()], dim=-1))
    scales_zeros = torch.cat(params, dim=1).to(PARAM_DTYPE)  # (groups per row, out_p, 2)
    error = math.sqrt(err2 / max(norm2, 1e-60))
    return QuantizedTensor(
        torch.cat(packed), scales_zeros.contiguous(), (n, k), w.dtype, 4, group_size, method, error
    )


def _quantize_int8(w: torch.Tensor) -> QuantizedTensor:
    """Symmetric per-channel 8 bits, zero-padded to `padded_shape`."""
    n, k = w.shape
    n_p, k_p = padded_shape(n, k, 8, 0)
    wf = torch.zeros(n_p, k_p)
    wf[:n, :k] = w.detach().float()
    scale = (wf.abs().amax(-1) / 127).clamp(min=1e-10).to(PARAM_DTYPE)
    scale[n:] = 0
    codes = torch.clamp(torch.round(wf / scale.float().clamp(min=1e-10)[:, None]), -127, 127)
    diff = torch.linalg.norm(codes * scale.float()[:, None] - wf)
    error = float(diff / torch.linalg.norm(wf).clamp(min=1e-30))
    return QuantizedTensor(codes.to(torch.int8), scale, (n, k), w.dtype, 8, 0, "rtn", error)


def relative_error(w: torch.Tensor, q: QuantizedTensor) -> float:
    """||W - deq(q(W))||_F / ||W||_F."""
    wf = w.float()
    return float(
        torch.linalg.norm(wf - q.dequantize().float()) / torch.linalg.norm(wf).clamp(min=1e-30)
    )
