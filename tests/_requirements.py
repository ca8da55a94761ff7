"""One rule for tests that need something optional (a package, a data file, a weight file).

Locally a missing requirement skips the test with a message naming what to install or
where the file should be; under CI (``CI=true``, as .ci/run is started) it fails the test,
so that a CI machine missing an install step cannot pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

__all__ = ["in_ci", "missing", "require_file", "require_module"]


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def missing(message: str) -> None:
    """Skip (locally) or fail (under CI=true) with ``message``."""
    if in_ci():
        pytest.fail(f"required under CI=true: {message}", pytrace=False)
    pytest.skip(message)


def require_file(path: str | os.PathLike, why: str) -> Path:
    """Return ``path`` if it exists, else skip/fail with ``why`` and the path."""
    p = Path(path)
    if not p.exists():
        missing(f"{why}: {p} not found")
    return p


def require_module(name: str, install_hint: str) -> None:
    """Skip/fail unless module ``name`` can be found (it is not imported here)."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        missing(f"module {name!r} is missing: {install_hint}")
