import os
import signal
import sys


def _interrupted_at_start_up(signum, frame):
    # Nothing is written before the command starts, so leave at once: a KeyboardInterrupt raised inside
    # a library's import can leave half-imported modules behind that fail later with a traceback.
    os.write(2, b"interrupted\n")
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_at_start_up)
from .experiments.cli import main  # noqa: E402 - torch, transformers: seconds
from .runtime.io import keep_interrupts  # noqa: E402

keep_interrupts()
signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, the command's own handling
sys.exit(main())
