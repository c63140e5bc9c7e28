"""The `localmix` command line: thin wrappers that parse input, call the library, render events."""

import contextlib
import importlib
import os
import signal
import sys

EXIT_INTERRUPTED = 130
# Invocations that never load a model: they start without PyTorch. `run` and `chat` are among
# them since they may answer through a running server (they import the runtime themselves
# with `import_runtime` when they load a model in-process), and so are `list` and `conversations`.
# Each maps to the modules it imports as it runs, imported before it starts (see `main`).
LIGHT_COMMANDS = {
    "run": (
        "localmix.cli.client",
        "localmix.workflows",
        "localmix.conversations",
        "localmix.session",
    ),
    "chat": ("localmix.cli.client", "localmix.conversations", "localmix.cli.chat"),
    "list": ("localmix.demo", "localmix.store", "localmix.workflows"),
    "conversations": ("localmix.conversations", "localmix.cli.chat"),
}
HELP_FLAGS = ("-h", "--help", "-V", "--version")
# What loading a model imports (`localmix.load`, the demo's note, the experts' placement).
RUNTIME_MODULES = (
    "localmix.loader",
    "localmix.tokenizer",
    "localmix.engine",
    "localmix.options",
    "localmix.cpu_decode",
    "localmix.hybrid",
    "localmix.demo",
)


def main() -> None:
    """The `localmix` command. Ctrl+C at any moment, even while it starts, ends it with one line
    on stderr and exit status 130.

    Until the command starts, Ctrl+C exits at once: a KeyboardInterrupt raised inside an
    import (typer imports pydantic as it parses the options) can be swallowed by a library's
    own `except` and leave a half-imported module behind (numpy then refuses to import again).
    From the command on (`command_started`), its error barrier handles it; so the modules a
    command imports as it runs are imported before it starts (`LIGHT_COMMANDS`,
    `RUNTIME_MODULES`).
    """
    signal.signal(signal.SIGINT, _exit_interrupted)
    from localmix.threads import prepare_process

    prepare_process()  # before PyTorch loads its OpenMP runtime, which reads the wait policy
    from localmix.cli.main import app

    args = sys.argv[1:]
    if needs_runtime(args):
        _import_runtime_modules()  # what the command imports, so that none is imported mid-command
    elif args and not asks_help(args):
        for module in LIGHT_COMMANDS.get(args[0], ()):
            importlib.import_module(module)
    try:
        app(prog_name="localmix")
    except KeyboardInterrupt:  # outside a command (typer's own parsing)
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


def needs_runtime(args: list[str]) -> bool:
    """Whether the command line `args` runs a command that loads PyTorch and the runtime up front:
    not for help or the version, nor for the commands that import it only when they need it."""
    if not args or asks_help(args):
        return False
    return args[0] not in LIGHT_COMMANDS


def asks_help(args: list[str]) -> bool:
    """Whether the command line asks for help or the version, not for a command to run."""
    return any(a in HELP_FLAGS for a in args)


def command_started() -> None:
    """From here on Ctrl+C raises KeyboardInterrupt, for the command's error barrier."""
    with contextlib.suppress(ValueError):  # not the main thread (a test's runner)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def import_runtime() -> None:
    """Import PyTorch and the runtime (what `localmix.load` needs) with Ctrl+C exiting at once,
    as it does while the command line starts: for a command that loads a model mid-way."""
    previous = signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        _import_runtime_modules()
    finally:
        signal.signal(signal.SIGINT, previous)


def _import_runtime_modules() -> None:
    for module in RUNTIME_MODULES:
        importlib.import_module(module)


def _exit_interrupted(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")
    os._exit(EXIT_INTERRUPTED)
