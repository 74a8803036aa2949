"""How fast is gpuloss on the CPU against PyTorch and the memory floor?

    python bench/cpu_suite.py [--quick]      # same as: gpuloss bench [--quick]

Prints the table of medians and writes bench/results/<date>-cpu-<machine>.{json,md,png}.
"""
import sys

from gpuloss.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
