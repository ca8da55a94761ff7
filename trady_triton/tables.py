"""The one table formatter behind every table the package prints, and its number formats.

    text_table(["policy", "acc %"], [["d-topk", "91.4"]], align="lr")
    markdown_table(["policy", "acc %"], [["d-topk", "91.4"]])
"""

from __future__ import annotations

from typing import Sequence


def mib(nbytes, digits: int = 2) -> str:
    """Bytes as MiB with ``digits`` decimals; "-" for an unknown (None) size."""
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:.{digits}f}"


def pct(fraction) -> str:
    """A fraction as a percentage with one decimal; "-" for None."""
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "r") -> str:
    """Columns padded to their widest cell, two spaces apart, a dashed rule under the header.

    ``align``: one letter per column ("l" left, "r" right), or one letter for all.
    """
    table = [list(header)] + [list(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    sides = align * len(header) if len(align) == 1 else align
    if len(sides) != len(header):
        raise ValueError(f"align={align!r}: give one letter (l or r) or one per column "
                         f"({len(header)})")

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if side == "l" else c.rjust(w)
                         for c, w, side in zip(cells, widths, sides))

    lines = [line(row) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (cells unpadded)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
