"""Modules whose forward is chosen once for where their tensors sit, not tested on every call.

A decode step calls every layer once per token, so tests of the device, the dtype and the
kernels available inside `forward` are paid a hundred times a token. A `KernelChoice` module
makes that choice on its first call and keeps it, and makes it again on the first call after its
tensors changed place: after `.to()` or any other move (`nn.Module._apply`), `load_state_dict`,
or a copy (`copy.deepcopy`, which the expert store uses to bind a module to other tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# A module's forward as a plain function of (module, activations): kept on the module without
# a reference back to it, so a model is freed as soon as it is dropped.
Kernel = Callable[[Any, torch.Tensor], torch.Tensor]


class MadeFromTensors(nn.Module):
    """A module that keeps something made from its tensors as they are (a kernel choice, a
    plan over their pointers) and must forget it when they change place: after `.to()` or any
    other move (`nn.Module._apply`), `load_state_dict`, or a copy (`copy.deepcopy`)."""

    def forget(self) -> None:
        """Drop what was made from the tensors; it is made again when next needed."""
        raise NotImplementedError

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        self.forget()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.forget()
        super()._load_from_state_dict(*args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.forget()


class KernelChoice(MadeFromTensors):
    """A module whose forward is the function `choose()` gives for its tensors as they are now.

    `chosen` is None until the first call, which asks `choose()`; moves, loads and copies set
    it back to None by themselves. Code that replaces a module's tensors some other way after it
    ran (a repack) calls `rechoose()`.
    """

    chosen: Kernel | None = None

    def choose(self) -> Kernel:
        """The forward for this module's tensors where they are now (device, dtype, layout), as
        a function of (module, activations): one of the class's methods, unbound."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = self.chosen
        if chosen is None:
            chosen = self.chosen = self.choose()
        return chosen(self, x)

    def rechoose(self) -> None:
        """Choose again on the next call."""
        self.__dict__.pop("chosen", None)

    def forget(self) -> None:
        self.rechoose()
