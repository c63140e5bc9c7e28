"""The `localmix` command line: thin wrappers that parse input, call the library, render events."""

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def main() -> None:
    """The `localmix` command. Ctrl+C at any moment, even while it starts, ends it with one line
    on stderr and exit status 130.

    While the modules are imported, Ctrl+C exits at once: a KeyboardInterrupt raised inside an
    import can be swallowed by a library's own `except` and leave a half-imported module behind
    (numpy then refuses to import again). From the command on, `friendly_errors` handles it.
    """
    signal.signal(signal.SIGINT, _exit_interrupted)
    from localmix.threads import prepare_process

    prepare_process()  # before PyTorch loads its OpenMP runtime, which reads the wait policy
    # What every command and `localmix.load` import, so that none is imported mid-command.
    from localmix.cli.main import app

    import localmix.loader  # noqa: F401
    import localmix.tokenizer  # noqa: F401

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app(prog_name="localmix")
    except KeyboardInterrupt:  # outside a command (typer's own parsing)
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


def _exit_interrupted(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")
    os._exit(EXIT_INTERRUPTED)
