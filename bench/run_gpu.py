#!/usr/bin/env python
"""Everything of bench/ that needs a GPU, in one command (< 8 minutes on one H100).

    python bench/run_gpu.py --out "$OUT"            # full run, time guard 450 s
    python bench/run_gpu.py --out "$OUT" --quick    # one-minute sanity pass

Writes ``$OUT/results.json``, ``$OUT/results.md`` and ``$OUT/cases.jsonl`` (one line per
case, written as it finishes) and prints the markdown tables last. Needs no install:
the repository root and its ``kernels/`` folder (as ``trady_triton.kernels``) are put on
the import path here. Afterwards, on any machine,
``python bench/run_gpu.py --render "$OUT" --update-results`` writes the tables into
bench/RESULTS.md. See run_bench.py for the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_device="cuda"))
