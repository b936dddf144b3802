"""Whether to draw progress: rich bars in a terminal, silence under CI=true or when piped."""
from __future__ import annotations

import os
import sys


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def interactive(stream=None) -> bool:
    stream = stream or sys.stdout
    return stream.isatty() and not under_ci()
