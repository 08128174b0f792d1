"""The console-script entry point, kept light: stop signals are handled from the first instant, so a
Ctrl-C or SIGTERM while torch and the plugins load ends in one line, not a traceback."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # answered before torch and the plugins load (~2 s)
        from .version import __version__

        print(f"adaptools, version {__version__}")
        return
    from .outputs import Interrupted, ignore_stop_signals, stop_signals_raise

    try:
        with stop_signals_raise():
            from .cli import main as cli_main

            cli_main()
    except KeyboardInterrupt as exc:
        ignore_stop_signals()
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"Interrupted ({signal.Signals(signum).name}): nothing was written.", file=sys.stderr)
        sys.exit(128 + signum)
