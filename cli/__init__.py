"""The `localmix` command line: thin wrappers that parse input, call the library, render events."""

import contextlib
import os
import signal
import sys

EXIT_INTERRUPTED = 130
# Invocations that never load a model: they start without PyTorch. `run` and `chat` are among
# them since they may answer through a running server (they import the runtime themselves
# with `import_runtime` when they load a model in-process), and so are `list` and `conversations`.
LIGHT_COMMANDS = ("run", "chat", "list", "conversations")
HELP_FLAGS = ("-h", "--help", "-V", "--version")


def main() -> None:
    """The `localmix` command. Ctrl+C at any moment, even while it starts, ends it with one line
    on stderr and exit status 130.

    Until the command starts, Ctrl+C exits at once: a KeyboardInterrupt raised inside an
    import (typer imports pydantic as it parses the options) can be swallowed by a library's
    own `except` and leave a half-imported module behind (numpy then refuses to import again).
    From the command on (`command_started`), its error barrier handles it.
    """
    signal.signal(signal.SIGINT, _exit_interrupted)
    from localmix.threads import prepare_process

    prepare_process()  # before PyTorch loads its OpenMP runtime, which reads the wait policy
    from localmix.cli.main import app

    if needs_runtime(sys.argv[1:]):
        _import_runtime_modules()  # what the command imports, so that none is imported mid-command
    try:
        app(prog_name="localmix")
    except KeyboardInterrupt:  # outside a command (typer's own parsing)
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


def needs_runtime(args: list[str]) -> bool:
    """Whether the command line `args` runs a command that loads PyTorch and the runtime up front:
    not for help or the version, nor for the commands that import it only when they need it."""
    if not args or any(a in HELP_FLAGS for a in args):
        return False
    return args[0] not in LIGHT_COMMANDS


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
    import localmix.loader  # noqa: F401
    import localmix.tokenizer  # noqa: F401


def _exit_interrupted(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")
    os._exit(EXIT_INTERRUPTED)
