"""``python -m miwv_lib`` and the ``miwv`` command: the CLI, with Ctrl-C handled from the first moment to the last."""
import os
import signal
import sys


def _interrupted_at_start_up(signum, frame):
    # Nothing is written before the command starts, so leave at once: a KeyboardInterrupt raised inside
    # a library's import can leave half-imported modules behind that fail later with a traceback.
    os.write(2, b"interrupted\n")
    os._exit(130)


def run() -> None:
    signal.signal(signal.SIGINT, _interrupted_at_start_up)
    from .experiments.cli import main  # torch, transformers: seconds
    from .runtime.io import keep_interrupts

    keep_interrupts()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, the command's own handling
    code = main()
    # The command is over and its files are written; a Ctrl-C in the seconds the interpreter takes to shut down
    # (torch's finalizers) would kill it with the default handler and turn a finished run into a failed one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
