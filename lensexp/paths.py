"""Resolving user paths: absolute, relative to the working directory, or to the project root."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def resolve_path(path: str | Path) -> Path:
    """Return ``path`` as given if it exists, else relative to the project root (if that exists).

    Relative paths in configs (e.g. ``../shared/data/...``) thus work from any working directory,
    Hydra run directories included. A path found nowhere is returned unchanged for the caller's
    error message.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    q = PROJECT_ROOT / p
    return q if q.exists() else p
