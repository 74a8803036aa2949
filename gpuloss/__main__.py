"""``python -m gpuloss``: the ``gpuloss`` command."""
import sys

from gpuloss.cli import main

if __name__ == "__main__":
    sys.exit(main())
