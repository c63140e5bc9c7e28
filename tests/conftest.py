"""Shared fixtures: tiny random checkpoints written by transformers, the reference implementation."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import save_reference, tiny_mixtral_config


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels_built():
    """Build localmix's CPU kernels before any test (a minute, once per machine), so that no
    test's output or timing depends on whether it happened to come first."""
    from localmix.quant.kernels import cpu_kernels

    cpu_kernels()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own model store, never the user's, and `run` and `chat` find no
    `localmix serve` (nothing listens on the discard port) unless a test starts one."""
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path_factory.getbasetemp() / "home"))
    monkeypatch.setenv("LOCALMIX_HOST", "127.0.0.1:9")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    """A tiny fp32 Mixtral in the Hugging Face layout, and its transformers model."""
    path = tmp_path_factory.mktemp("tiny_mixtral")
    model = save_reference(path, tiny_mixtral_config())
    return path, model
