"""A tiny dependency-free progress bar on stderr.

    for batch in progress_bar(batches, desc="epoch 1", total=len(batches)):
        ...

It draws only when stderr is a terminal and progress is not switched off
(``set_quiet(True)``, the command's ``--quiet``, or ``TRADY_QUIET=1``); otherwise
it yields the items unchanged and writes nothing, so logs and pipes stay clean.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Switch every progress bar of this process off (True) or back on (False)."""
    global _quiet
    _quiet = bool(quiet)


def enabled(stream=None) -> bool:
    """True when a bar would be drawn on ``stream`` (default: stderr)."""
    stream = sys.stderr if stream is None else stream
    if _quiet or os.environ.get("TRADY_QUIET", "") not in ("", "0"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:      # closed stream
        return False


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def progress_bar(iterable: Iterable[T], desc: str = "", total: int | None = None,
                 disable: bool | None = None, width: int = 24, stream=None,
                 min_interval: float = 0.1) -> Iterator[T]:
    """Yield the items of ``iterable`` while drawing ``desc [####....] i/total`` on stderr.

    ``total`` defaults to ``len(iterable)`` when it has one. ``disable=None`` means
    "draw only on a terminal and when not quiet"; True / False force it.
    """
    stream = sys.stderr if stream is None else stream
    show = enabled(stream) if disable is None else not disable
    if not show:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)   # type: ignore[arg-type]
        except TypeError:
            total = None
    start = last = time.monotonic()
    count = 0

    def draw(final: bool = False) -> None:
        elapsed = time.monotonic() - start
        rate = count / elapsed if elapsed > 0 else 0.0
        if total:
            done = min(count / total, 1.0)
            filled = int(round(done * width))
            bar = "#" * filled + "." * (width - filled)
            eta = (total - count) / rate if rate > 0 and count < total else 0.0
            text = (f"{desc} [{bar}] {count}/{total} {_fmt_seconds(elapsed)}"
                    f"<{_fmt_seconds(eta)} {rate:.1f}it/s")
        else:
            text = f"{desc} {count} {_fmt_seconds(elapsed)} {rate:.1f}it/s"
        stream.write("\r" + text + ("\n" if final else ""))
        stream.flush()

    try:
        draw()
        for item in iterable:
            yield item
            count += 1
            now = time.monotonic()
            if now - last >= min_interval:
                last = now
                draw()
    finally:
        draw(final=True)
