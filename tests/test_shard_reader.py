"""The fast shard reader (``lensexp.shard_reader``) against the standard library and webdataset:
the same members and arrays from archives of every common tar format, the same samples in the
same order from a training stream, and one clear error for damaged shards."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from lensexp.shard_reader import ShardReadError, npy_array, tar_members


def _members(fmt: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A tar archive in ``fmt`` written by tarfile: short and >100-character names, a directory,
    a symlink, an empty file, a webdataset metadata member, a float mtime (pax) and a non-ASCII
    name (pax / GNU long name)."""
    rng = np.random.default_rng(0)
    files = [
        ("a-000.image.npy", rng.bytes(1000)),
        ("sub/" + "k" * 120 + ".params.json", b'{"theta_E": 1.0}'),
        ("a-001.empty.bin", b""),
        ("__index__", b"meta"),
        ("b-\u00e9.meta.json", rng.bytes(512)),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        ln = tarfile.TarInfo("link")
        ln.type, ln.linkname = tarfile.SYMTYPE, "a-000.image.npy"
        tf.addfile(ln)
        for i, (name, data) in enumerate(files):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000.5 + i
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue(), [(n, d) for n, d in files if n != "__index__"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_members_match_tarfile_for_pax_and_gnu_archives(fmt):
    raw, want = _members(fmt)
    got = [(m["fname"], m["data"]) for m in tar_members(io.BytesIO(raw))]
    assert got == want  # regular files only, in order, long and non-ASCII names, metadata skipped


def test_tar_members_reads_the_project_writer_and_ustar_prefixes():
    from lensexp.shards import TarShardWriter

    buf = io.BytesIO()
    w = TarShardWriter(buf)
    w.add_many(["x-0.image.npy", "x-0.params.json"], [b"\1" * 700, b"{}"])
    w.close()
    assert [(m["fname"], m["data"]) for m in tar_members(io.BytesIO(buf.getvalue()))] == [
        ("x-0.image.npy", b"\1" * 700),
        ("x-0.params.json", b"{}"),
    ]
    ref = io.BytesIO()  # a 140-character path: ustar splits it into prefix and name
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("d" * 60 + "/" + "e" * 79 + ".npy")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    assert [m["fname"] for m in tar_members(io.BytesIO(ref.getvalue()))] == ["d" * 60 + "/" + "e" * 79 + ".npy"]


def test_damaged_shards_raise_one_clear_error():
    raw, _ = _members(tarfile.PAX_FORMAT)
    bad = bytearray(raw)
    bad[0] ^= 0xFF  # the first header's name: checksum no longer matches
    with pytest.raises(ShardReadError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(bad)), where="s.tar"))
    with pytest.raises(ShardReadError, match="unexpected end of data"):
        list(tar_members(io.BytesIO(raw[:2000])))  # cut inside a member
    with pytest.raises(ShardReadError, match="empty file"):
        list(tar_members(io.BytesIO(b"")))
    with pytest.raises(ShardReadError, match="checksum"):
        list(tar_members(io.BytesIO(b"not a tar file at all" * 40)))


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(24, dtype="<f4").reshape(2, 3, 4),
        np.arange(6, dtype=">f8").reshape(3, 2),
        np.asfortranarray(np.arange(6, dtype="<i4").reshape(2, 3)),
        np.float32(2.5),
    ],
    ids=["f4", "big-endian f8", "fortran", "scalar"],
)
def test_npy_array_equals_numpy_load_on_first_and_cached_reads(arr):
    b = io.BytesIO()
    np.save(b, arr)
    data = b.getvalue()
    for _ in range(2):  # the second read takes the cached header
        got = npy_array(data)
        ref = np.load(io.BytesIO(data))
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)
        assert got.flags.writeable  # torch.from_numpy of it: no read-only warning
    with pytest.raises(ValueError, match="truncated|EOF"):
        npy_array(data[:-4] if arr.size > 1 else data[:-2])
    with pytest.raises(ValueError, match="magic"):
        npy_array(b"PK\x03\x04" + data)


def test_training_stream_gives_webdataset_s_samples_in_the_same_order(tmp_path):
    """A resampled, shuffled training stream and an evaluation stream through the fast reader
    equal the same pipelines on webdataset's own tarfile reader, sample by sample."""
    import webdataset as wds

    from lensexp.data import decode_sample, shard_dataset, shard_urls
    from lensexp.simulate import run as simulate
    from tests.test_simulate import cfg_for

    simulate(cfg_for(tmp_path, "n=60", "shard_size=10", "splits={train:40,val:20,test:0}"))
    urls = shard_urls(tmp_path, "train")
    shards = wds.ResampledShards(urls, seed=5, deterministic=True)
    shards.epoch = 1  # start_epoch 2
    ref = wds.DataPipeline(shards, wds.tarfile_to_samples(), wds.shuffle(16, seed=5), wds.map(decode_sample))
    a = list(ref.with_epoch(50))
    b = list(shard_dataset(urls, 16, True, 50, seed=5, start_epoch=2))
    assert len(a) == len(b) == 50
    for x, y in zip(a, b):
        assert x["__key__"] == y["__key__"] and torch.equal(x["image"], y["image"])
        assert torch.equal(x["labels"], y["labels"]) and x["meta"] == y["meta"]
    val = shard_urls(tmp_path, "val")
    a = list(wds.WebDataset(val, shardshuffle=False, empty_check=False).map(decode_sample))
    b = list(shard_dataset(val))
    assert [x["__key__"] for x in a] == [y["__key__"] for y in b] and len(b) == 20
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def _one_member(fmt: int, name: str, data: bytes) -> bytearray:
    """A tar archive in ``fmt`` holding one file, as tarfile writes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return bytearray(buf.getvalue())


def test_gnu_headers_keep_times_where_posix_keeps_the_prefix():
    """GNU tar's magic ("ustar  ") keeps access/change times in the bytes POSIX uses for the name
    prefix: they must not become part of the name; a malformed pax record is one clear error."""
    raw = _one_member(tarfile.GNU_FORMAT, "k.image.npy", b"abc")
    raw[345:357] = b"%011o\0" % 1_700_000_000  # GNU atime
    raw[148:156] = b"%06o\0 " % (256 + sum(raw[:148]) + sum(raw[156:512]))
    assert [m["fname"] for m in tar_members(io.BytesIO(bytes(raw)))] == ["k.image.npy"]
    bad = _one_member(tarfile.PAX_FORMAT, "\u00e9.bin", b"x")  # a pax record for the name
    i = bad.index(b" path=")
    bad[i - 2 : i] = b"zz"  # the record's length is no number
    with pytest.raises(ShardReadError, match="malformed pax"):
        list(tar_members(io.BytesIO(bytes(bad))))
