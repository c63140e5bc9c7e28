"""Quantized formats for localmix: pure tensor functions, the quantized linear module, the converter.

This package does not import the runtime, and importing it is cheap: the modules that compute
(and PyTorch) are imported when first used, so the model store reads its files without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .formats import QuantizedTensor, quantize_tensor
    from .linear import QuantLinear

__all__ = ["QuantizedTensor", "quantize_tensor", "QuantLinear"]

_LAZY = {"QuantizedTensor": ".formats", "quantize_tensor": ".formats", "QuantLinear": ".linear"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'localmix.quant' has no attribute '{name}'")
