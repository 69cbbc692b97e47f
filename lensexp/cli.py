"""Helpers shared by the command-line entry points."""

from __future__ import annotations

import functools
import logging
import sys

from lensexp.errors import ConfigError

log = logging.getLogger("lensexp")


def clean_errors(fn):
    """Turn a :class:`ConfigError` (or a missing file) into one ``error: ...`` line and exit 2;
    the glibc allocator is tuned first (:func:`lensexp.runtime.tune_allocator`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lensexp.runtime import tune_allocator

        tune_allocator()
        try:
            return fn(*args, **kwargs)
        except (ConfigError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
