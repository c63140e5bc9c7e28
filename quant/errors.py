"""The quantizer's error, in a module of its own so that the file gates (`files`) and the
model store use it without importing PyTorch."""

from __future__ import annotations


class QuantError(ValueError):
    """A tensor or setting the quantizer cannot handle."""
