"""``python -m trady_triton`` = ``trady-finetune``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
