"""The ``zupatch`` command (console script) and ``python -m zupatch``.

Ctrl-C at any moment ends the command with one line on stderr and exit code
130, start-up included: importing the CLI (typer, rich, every command) takes a
noticeable time, so that import happens in :func:`main`, under the handler, and
this module and its package import nothing heavy themselves (see :mod:`zupatch`).
"""

import sys


def main() -> None:
    """Run the CLI (:func:`zupatch.cli.main.main`): Ctrl-C before it takes over is one line too."""
    try:
        from zupatch.cli.main import main as run

        run()
    except KeyboardInterrupt:  # during the imports, before the CLI handles it itself
        _exit_interrupted("interrupted: nothing was written\n")
    except SystemExit as exc:
        if exc.code == 130:  # interrupted, and the CLI said so
            _exit_interrupted("")
        raise


def _exit_interrupted(message: str) -> None:
    """Say ``message`` and exit with status 130, whatever else happens.

    ``os._exit`` because CPython, after a KeyboardInterrupt that escaped code
    run by ``exec`` (dataclasses build their methods that way, so any import may
    do it), ends the process by SIGINT at exit even when the exception was
    handled, which makes the status depend on where Ctrl-C landed. Everything
    that needs undoing has been undone by then: the CLI's commands clean up
    while the exception unwinds.
    """
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the goodbye
    for stream, text in ((sys.stdout, ""), (sys.stderr, message)):
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or missing: the status still says it
            pass
    os._exit(130)


if __name__ == "__main__":
    main()
