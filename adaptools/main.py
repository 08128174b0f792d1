"""The console-script entry point, kept light: stop signals are handled from the first instant, so a
Ctrl-C or SIGTERM while torch and the plugins load ends in one line, not a traceback.

Loading runs with Python's cyclic garbage collector off, and what it made is then frozen (``gc.freeze``):
importing torch creates some million objects, none of them garbage, and the collections that their number sets
off walk all of them. Measured on 2 cores: ``python -c "import torch"`` 1.58-1.91 s, the same import with the
collector off 1.06-1.24 s (docs/merge-engine.md, "Start-up").
"""

from __future__ import annotations

import gc
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
            gc.disable()
            try:
                from .cli import get_cli

                cli = get_cli()
            finally:
                gc.freeze()  # later collections skip what loading made
                gc.enable()
            cli(prog_name="adaptools")
    except KeyboardInterrupt as exc:
        ignore_stop_signals()
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"Interrupted ({signal.Signals(signum).name}): nothing was written.", file=sys.stderr)
        sys.exit(128 + signum)
