import sys

from .io import keep_interrupts  # light: nothing of torch yet

keep_interrupts()
try:  # Ctrl-C while torch and transformers are still importing: one line, not a traceback
    from .cli import main
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
