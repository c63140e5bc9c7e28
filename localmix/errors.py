"""The project's own exceptions: every error a user can cause carries a message that says what to do."""

from __future__ import annotations


class LocalmixError(Exception):
    """Base class of every error a user can hit; the CLI prints it in one line and exits 1."""


class ConfigError(LocalmixError):
    """A `config.json` that is missing, unreadable, or describes a model localmix cannot run."""


class CheckpointError(LocalmixError):
    """A checkpoint whose files are missing, truncated, corrupt, or hold the wrong tensors."""


class TokenizerError(LocalmixError):
    """A missing or unreadable `tokenizer.model`."""


class ModelNotFoundError(LocalmixError):
    """A model name that is neither a path, a store entry, nor a built-in model."""


class HubError(LocalmixError):
    """A download that failed: gated or missing repository, no token, no network."""


class DiskSpaceError(LocalmixError):
    """Not enough free disk space for what was asked."""


class MemoryBudgetError(LocalmixError):
    """A device memory budget too small for the model's trunk, KV cache and minimum expert slots."""


class OptionError(LocalmixError, ValueError):
    """A generation or load option outside its range."""
