"""Output files that are whole or absent: writability checked before work, temporary names
renamed into place, and temporary files of killed runs removed by the next run.

A temporary file is named ``.<final name>.tmp-<pid>`` beside its final name; a later run removes
those whose process no longer exists (a concurrent run's files are left alone).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lensexp.errors import ConfigError

_TMP = re.compile(r"^\.(?P<final>.+)\.tmp-(?P<pid>\d+)$")


def temp_path(final: Path) -> Path:
    """The temporary name of ``final`` for this process."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(folder: Path, finals: tuple[str, ...] | None = None) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` files in ``folder`` left by processes that have ended
    (only those of the names ``finals``, when given); returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        m = _TMP.match(f.name)
        if not m or (finals is not None and m["final"] not in finals) or _alive(int(m["pid"])):
            continue
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
    return removed


def check_writable(*paths: str | Path) -> None:
    """Refuse, before any work, outputs that cannot be written: a folder in the way, a parent that
    cannot be created or written, or an existing read-only file. Creates missing parents."""
    for p in map(Path, paths):
        if p.is_dir():
            raise ConfigError(f"output '{p}' is a folder; give a file name")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            probe = temp_path(p.with_name(p.name + ".probe"))
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write output '{p}': {exc.strerror or exc}") from None
        if p.exists() and not os.access(p, os.W_OK):
            raise ConfigError(f"cannot write output '{p}': the existing file is read-only")


def replace(tmp: Path, final: Path) -> None:
    """Move a finished temporary file into place (atomic on one file system)."""
    os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name."""
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
