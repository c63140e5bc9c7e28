"""What importing parts of localmix loads: the command line's help and the client side of `run`
start without PyTorch, and `localmix.quant` without the runtime (read from `-X importtime`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

RUNTIME = {"localmix.engine", "localmix.model", "localmix.offload", "localmix.tokenizer"}


def imported(*args: str) -> set[str]:
    """The modules a fresh interpreter imports to run `python -X importtime ARGS`."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line]
    return set(lines)


def test_quant_does_not_import_the_runtime():
    assert not imported("-c", "import localmix.quant") & RUNTIME


@pytest.mark.parametrize(
    "args", [("--help",), ("-h",), ("--version",), ("run", "--help"), ("chat", "--help")]
)
def test_help_and_version_do_not_import_torch(args):
    modules = imported("-m", "localmix.cli", *args)
    assert "torch" not in modules and not modules & RUNTIME


@pytest.mark.parametrize("command", ["list", "conversations"])
def test_listing_models_and_conversations_does_not_import_torch(command, tmp_path, monkeypatch):
    """`list` reads each model's manifest through quant.manifest, which needs no PyTorch."""
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    modules = imported("-m", "localmix.cli", command)
    assert "torch" not in modules and not modules & RUNTIME
    assert "localmix.quant.manifest" in modules or command != "list"


def test_the_manifest_module_does_not_import_torch():
    assert "torch" not in imported("-c", "import localmix.quant.manifest")


def test_the_client_side_of_run_and_chat_does_not_import_torch():
    modules = imported("-c", "import localmix.cli.client, localmix.cli.chat, localmix.store")
    assert "torch" not in modules and not modules & RUNTIME


def test_the_defaults_are_the_runtimes():
    from localmix.quant import formats

    from localmix import defaults, engine, expert_cache, offload

    assert defaults.DEFAULT_POLICY == expert_cache.DEFAULT_POLICY
    assert defaults.DEFAULT_PREFETCH == offload.DEFAULT_PREFETCH
    assert defaults.QUANT_METHODS == formats.METHODS
    assert defaults.DEFAULT_METHOD == formats.DEFAULT_METHOD
    assert defaults.DEFAULT_CONTEXT == engine.DEFAULT_CONTEXT
