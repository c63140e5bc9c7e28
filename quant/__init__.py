"""Quantized formats for localmix: pure tensor functions, the quantized linear module, the converter.

This package does not import the runtime.
"""

from .formats import QuantizedTensor, quantize_tensor
from .linear import QuantLinear

__all__ = ["QuantizedTensor", "quantize_tensor", "QuantLinear"]
