"""Progress bars on stderr (tqdm), drawn only where someone watches.

    for batch in progress_bar(batches, desc="epoch 1", total=len(batches)):
        ...

A bar is drawn only when stderr is a terminal and progress is not switched off
(``set_quiet(True)``, the commands' ``--quiet``, or ``TRADY_QUIET=1``); otherwise the
items pass through unchanged and nothing is written, so logs and pipes stay clean.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

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


def progress_bar(iterable: Iterable[T], desc: str = "", total: int | None = None,
                 disable: bool | None = None, stream=None,
                 min_interval: float = 0.1) -> Iterator[T]:
    """Yield the items of ``iterable`` while tqdm draws ``desc`` and ``i/total`` on stderr.

    ``disable=None`` means "draw only on a terminal and when not quiet"; True / False
    force it. ``total`` defaults to ``len(iterable)`` when it has one.
    """
    stream = sys.stderr if stream is None else stream
    show = enabled(stream) if disable is None else not disable
    if not show:
        return iter(iterable)
    return iter(tqdm(iterable, desc=desc, total=total, file=stream, mininterval=min_interval,
                     dynamic_ncols=True, leave=True))
