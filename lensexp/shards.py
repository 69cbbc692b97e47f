"""Shard encoding and writing: samples -> WebDataset tar members, at the renderer's speed.

A sample becomes ``<key>.image.npy`` (float32 [bands, H, W]), ``<key>.params.json``,
``<key>.meta.json`` and, when kept, ``<key>.noise_var.npy``; ``lensexp.data`` (any tar reader,
``webdataset`` included) reads them back.

:class:`TarShardWriter` writes POSIX ustar members directly: one 512-byte header per member built
from a template (mode 0444, owner ``lensexp``, mtime 0), the data, zero padding, and the usual two
zero blocks plus padding to a 10 240-byte record at the end - what ``tarfile`` writes for these
names, without its pax headers (``tarfile`` adds a pax record for every member whose mtime is a
float) or its per-member object churn. The sha256 is computed on the bytes as they are written,
so the shard is never read back. The bytes depend only on the samples.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile / GNU tar pad archives to whole 10 240-byte records
_MAX_NAME = 100  # ustar name field; longer keys would need a prefix field or pax
_ZEROS = bytes(BLOCK)


def _octal(value: int, width: int) -> bytes:
    """``width``-byte NUL-terminated zero-padded octal field."""
    return b"%0*o\0" % (width - 1, value)


def _octal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """ASCII octal digits [len(values), width] (zero-padded) of non-negative integers."""
    shifts = 3 * np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 7).astype(np.uint8) + ord("0")


def _header_template(user: str, group: str) -> bytearray:
    """A ustar header with everything but name, size and checksum filled in."""
    h = bytearray(BLOCK)
    h[100:108] = _octal(0o444, 8)  # mode
    h[108:116] = _octal(0, 8)  # uid
    h[116:124] = _octal(0, 8)  # gid
    h[136:148] = _octal(0, 12)  # mtime
    h[156:157] = b"0"  # regular file
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[265 : 265 + len(user)] = user.encode()
    h[297 : 297 + len(group)] = group.encode()
    return h


class TarShardWriter:
    """Append members to an open binary file as a ustar archive, hashing what is written.

    ``write(sample)`` takes a WebDataset-style dict (``__key__`` plus ``ext -> bytes``);
    ``close()`` writes the end-of-archive blocks and returns ``(sha256 hex, bytes written)``.
    """

    def __init__(self, fh, user: str = "lensexp", group: str = "lensexp"):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self._template = _header_template(user, group)
        self._base_sum = sum(self._template) + 8 * 32  # checksum field counted as spaces

    def _emit(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.nbytes += len(data)

    def add(self, name: str, data: bytes) -> None:
        """One regular-file member ``name`` (ASCII, < 100 bytes) holding ``data``."""
        raw = name.encode("ascii")
        if len(raw) >= _MAX_NAME:
            raise ValueError(f"tar member name too long for ustar ({len(raw)} bytes): {name}")
        h = bytearray(self._template)
        h[0 : len(raw)] = raw
        size = _octal(len(data), 12)
        h[124:136] = size
        chk = self._base_sum + sum(raw) + sum(size)
        h[148:156] = b"%06o\0 " % chk
        pad = -len(data) % BLOCK
        self._emit(b"".join((h, data, _ZEROS[:pad])))  # one write and one hash update per member

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext != "__key__":
                self.add(f"{key}.{ext}", data)

    def add_many(self, names: list[str], datas: list[bytes]) -> None:
        """Members ``names[i]`` holding ``datas[i]``, in order: the same bytes as :meth:`add` for
        each, with the headers built by numpy for all at once and one write and one hash update
        for the lot (the per-member Python cost of :meth:`add` was a third of shard writing)."""
        m = len(names)
        if m == 0:
            return
        raw = [n.encode("ascii") for n in names]
        longest = max(map(len, raw))
        if longest >= _MAX_NAME:
            bad = next(n for n in names if len(n.encode("ascii")) >= _MAX_NAME)
            raise ValueError(f"tar member name too long for ustar ({longest} bytes): {bad}")
        h = np.empty((m, BLOCK), np.uint8)
        h[:] = np.frombuffer(bytes(self._template), np.uint8)
        name_block = np.frombuffer(b"".join(r.ljust(_MAX_NAME, b"\0") for r in raw), np.uint8).reshape(m, _MAX_NAME)
        h[:, :_MAX_NAME] = name_block
        sizes = np.fromiter(map(len, datas), np.int64, m)
        h[:, 124:135] = _octal_digits(sizes, 11)  # 11 digits and a NUL, as _octal(size, 12)
        h[:, 135] = 0
        chk = self._base_sum + name_block.sum(1, dtype=np.int64) + h[:, 124:136].sum(1, dtype=np.int64)
        h[:, 148:154] = _octal_digits(chk, 6)
        h[:, 154] = 0
        h[:, 155] = 32
        pads = -sizes % BLOCK
        parts = []
        for i in range(m):
            parts += (h[i].tobytes(), datas[i], _ZEROS[: pads[i]])
        self._emit(b"".join(parts))

    def close(self) -> tuple[str, int]:
        end = 2 * BLOCK
        end += -(self.nbytes + end) % RECORD
        self._emit(bytes(end))
        return self.sha.hexdigest(), self.nbytes


# ---------------------------------------------------------------------------- encoding
_NPY_HEADERS: dict = {}


def npy_bytes(a: np.ndarray) -> bytes:
    """``np.save`` bytes of ``a`` as little-endian float32 (format 1.0), header cached per shape."""
    a = np.ascontiguousarray(a, dtype="<f4")
    head = _NPY_HEADERS.get(a.shape)
    if head is None:
        d = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {a.shape!r}, }}"
        d += " " * (-(len(d) + 11) % 64) + "\n"  # magic(6) + version(2) + length(2) + dict, 64-aligned
        head = _NPY_HEADERS[a.shape] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode("latin1")
    return head + a.tobytes()


_JSON = json.JSONEncoder(sort_keys=True)  # one encoder: json.dumps(sort_keys=...) builds one per call


def json_bytes(d: dict) -> bytes:
    """``json.dumps(d, sort_keys=True)`` as UTF-8 bytes."""
    return _JSON.encode(d).encode()


def json_rows(columns: dict[str, list]) -> list[bytes]:
    """:func:`json_bytes` of every row ``{k: columns[k][i]}`` of equal-length columns, at once.

    Columns of finite floats, ints or bools (labels, meta) go through one %-format template, about
    twice as fast; the text is the same (JSON writes a float as its ``repr``). Other columns fall
    back to the encoder row by row.
    """
    keys = sorted(columns)
    n = len(columns[keys[0]]) if keys else 0
    conv = []
    for k in keys:
        col = columns[k]
        kinds = {type(v) for v in col}
        if len(col) != n or len(kinds) > 1 or not isinstance(k, str):
            conv = None
            break
        kind = kinds.pop() if kinds else float
        if kind is float and not np.all(np.isfinite(np.asarray(col, dtype=np.float64))):
            conv = None
            break
        if kind not in (float, int, bool):
            conv = None
            break
        conv.append((k, kind))
    if conv is None:
        return [json_bytes({k: columns[k][i] for k in columns}) for i in range(n)]
    fmt = (
        "{"
        + ", ".join(
            _JSON.encode(k).replace("%", "%%") + ": " + {float: "%r", int: "%d", bool: "%s"}[kind] for k, kind in conv
        )
        + "}"
    )
    cols = [["true" if v else "false" for v in columns[k]] if kind is bool else columns[k] for k, kind in conv]
    return [(fmt % row).encode() for row in zip(*cols)]


def encode_sample(s: dict) -> dict:
    """Sample dict -> WebDataset entry: ``image.npy`` (float32 [bands, H, W]), ``params.json``,
    ``meta.json`` and, when present, ``noise_var.npy``."""
    out = {
        "__key__": s["__key__"],
        "image.npy": npy_bytes(s["image"]),
        "params.json": json_bytes(s["params"]),
        "meta.json": json_bytes(s["meta"]),
    }
    if "noise_var" in s:
        out["noise_var.npy"] = npy_bytes(s["noise_var"])
    return out


# ---------------------------------------------------------------------------- label statistics
class LabelStats:
    """Running count, min, max and sum of each label, fed one label array [n, L] per batch."""

    def __init__(self, names):
        self.names = list(names)
        self.n, self.lo, self.hi, self.sum = 0, None, None, None

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1, len(self.names))
        if not len(v):
            return
        lo, hi, s = v.min(0), v.max(0), v.sum(0)
        if self.lo is None:
            self.lo, self.hi, self.sum = lo, hi, s
        else:
            self.lo, self.hi, self.sum = np.minimum(self.lo, lo), np.maximum(self.hi, hi), self.sum + s
        self.n += len(v)

    def to_dict(self) -> dict:
        if self.lo is None:
            return {}
        return {
            k: {"min": float(self.lo[i]), "max": float(self.hi[i]), "sum": float(self.sum[i]), "n": self.n}
            for i, k in enumerate(self.names)
        }


def merge_label_stats(records: list[dict]) -> dict:
    """Label ranges and means over shard records."""
    out: dict = {}
    for r in records:
        for k, s in r["labels"].items():
            o = out.setdefault(k, {"min": s["min"], "max": s["max"], "sum": 0.0, "n": 0})
            o["min"], o["max"] = min(o["min"], s["min"]), max(o["max"], s["max"])
            o["sum"] += s["sum"]
            o["n"] += s["n"]
    return {k: {"min": v["min"], "max": v["max"], "mean": v["sum"] / max(v["n"], 1)} for k, v in out.items()}


__all__ = [
    "TarShardWriter",
    "npy_bytes",
    "json_bytes",
    "encode_sample",
    "LabelStats",
    "merge_label_stats",
]
