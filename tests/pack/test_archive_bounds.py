"""Hostile build contexts: each kind of archive bomb is refused naming its limit, before a file is
written, in memory that stays flat (tracemalloc's peak, around the call, under FLAT bytes)
whatever the archive declares; and what survives the check is written safely (pack/archive.py).

The archives are made by hand (`header`), as an attacker would: tarfile will not write most of
them. A previous version read them with tarfile, which read a 100 MB PAX header whole (a
298 KiB upload took a node to 331 MB) and made 100k folders out of 459 KiB.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import pytest
import trio

from formation.pack import archive
from formation.pack import context as ctx
from formation.pack.archive import ContextError, ContextTooLarge, Limits

MiB = 1024 * 1024
FLAT = 16 * MiB  # the most a check or an unpack may allocate, whatever the archive


def header(name: bytes | str, size: int = 0, kind: bytes = b"0", link: bytes | str = b"", mode: int = 0o644) -> bytes:
    """One ustar header block, checksum and all."""
    name = name.encode() if isinstance(name, str) else name
    link = link.encode() if isinstance(link, str) else link
    h = bytearray(512)
    h[0:len(name[:100])] = name[:100]
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[157:157 + len(link)] = link
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def pad(n: int) -> bytes:
    return bytes(-n % 512)


def member(name, data: bytes = b"", kind: bytes = b"0", link="", mode=0o644) -> bytes:
    return header(name, len(data), kind, link, mode) + data + pad(len(data))


def pax(records: dict[str, str]) -> bytes:
    body = b""
    for k, v in records.items():
        rec = f" {k}={v}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n = len(str(n)) + len(rec)
        body += str(n).encode() + rec
    return member("././@PaxHeader", body, b"x")


END = bytes(1024)


def gz(*parts) -> bytes:
    """A gzip stream of `parts`: bytes, or (byte, count) for `count` repeats made a MiB at a time."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = []
    for p in parts:
        if isinstance(p, tuple):
            fill, count = p
            block = fill * MiB
            while count > 0:
                out.append(z.compress(block[:min(count, MiB)]))
                count -= MiB
        else:
            out.append(z.compress(p))
    out.append(z.flush())
    return b"".join(out)


def refused(data: bytes, tmp_path: Path, limits: Limits = archive.DEFAULT) -> ContextError:
    """The refusal of unpacking `data`, checked: nothing was written and memory stayed flat."""
    dest = tmp_path / "out"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(ContextError) as exc:
            ctx.unpack(data, dest, limits=limits)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < FLAT, f"{peak / MiB:.1f} MiB allocated refusing it"
    assert not dest.exists() or not any(dest.iterdir()), "written before it was refused"
    return exc.value


def test_a_pax_header_declared_100_mb_is_refused_before_it_is_read(tmp_path):
    data = gz(header("././@PaxHeader", 100 * MiB, b"x"), (b"\0", 100 * MiB), END)
    assert len(data) < 300 * 1024  # the upload that took a node to 331 MB
    err = refused(data, tmp_path)
    assert isinstance(err, ContextTooLarge) and err.limit == "header"
    assert "limit 'header'" in str(err) and str(100 * MiB) in str(err) and "shorten" in str(err)


def test_a_gnu_long_name_declared_100_mb_is_refused_too(tmp_path):
    err = refused(gz(header("././@LongLink", 100 * MiB, b"L"), (b"a", 100 * MiB), END), tmp_path)
    assert err.limit == "header"


def test_100k_folders_are_refused_at_the_folder_limit(tmp_path):
    named = gz(b"".join(header(f"d{i:06d}/", 0, b"5") for i in range(100_000)), END)
    assert len(named) < 500 * 1024  # the 459 KiB upload that made 100k folders (392 MiB of disk)
    err = refused(named, tmp_path)
    assert err.limit == "dirs" and err.entry == f"d{Limits().dirs:06d}/"
    # folders implied by the files' paths count as well
    implied = gz(b"".join(header(f"d{i:06d}/f") for i in range(100_000)), END)
    assert refused(implied, tmp_path).limit == "dirs"


def test_many_tiny_entries_are_refused_at_the_entry_limit(tmp_path):
    err = refused(gz(b"".join(header(f"f{i:06d}") for i in range(100_000)), END), tmp_path)
    assert err.limit == "entries" and "node_modules" in str(err)


@pytest.mark.parametrize("name,limit", [
    ("a/" * 40 + "f", "depth"),  # 40 folders deep
    ("/".join(["d" * 200] * 6), "path"),  # 1.2 KB
    ("x" * 300, "name"),  # one 300-byte name
])
def test_deep_and_long_paths_are_refused(tmp_path, name, limit):
    data = gz(pax({"path": name}), member("placeholder", b"x"), END)
    err = refused(data, tmp_path)
    assert err.limit == limit, err


def test_a_huge_gzip_ratio_is_refused_before_it_is_all_inflated(tmp_path):
    data = gz(header("zeros", 60 * MiB), (b"\0", 60 * MiB), pad(60 * MiB), END)
    err = refused(data, tmp_path)
    assert err.limit == "ratio" and err.entry == "zeros" and "RUN step" in str(err)
    # within the ratio, over the unpacked bytes: refused at the header, nothing inflated past it
    big = gz(header("big", 1 << 40), (b"\0", MiB))
    assert refused(big, tmp_path).limit == "unpacked"


def test_headers_in_all_are_bounded(tmp_path):
    # each PAX header within its limit, 40 of them over a metadata budget of 2 MiB
    data = gz(b"".join(pax({"comment": os.urandom(30_000).hex()}) + header(f"f{i}") for i in range(40)), END)
    err = refused(data, tmp_path, Limits(metadata=2 * MiB))
    assert err.limit == "metadata" and err.entry is not None


@pytest.mark.parametrize("entries,problem", [
    ([member("l", kind=b"2", link="../../etc")], "outside"),
    ([member("sub/l", kind=b"2", link="../../etc")], "outside"),
    ([member("l", kind=b"2", link="/etc/shadow")], "absolute"),
    # each link alone stays inside; together, in either order, l would reach the parent
    ([member("s", kind=b"2", link="."), member("l", kind=b"2", link="s/../etc")], "after a name"),
    ([member("l", kind=b"2", link="s/../etc"), member("s", kind=b"2", link=".")], "after a name"),
    # a file written through a link
    ([member("s", kind=b"2", link="sub"), member("s/x", b"owned")], "which is a link"),
    ([member("a/x", b"1"), member("a", kind=b"2", link="..")], "twice"),
    ([member("x", b"1"), member("x", b"2")], "twice"),
    ([member("h", kind=b"1", link="../../etc/passwd")], "hard links"),
    ([member("h", kind=b"1", link="x")], "hard links"),
    ([member("dev", kind=b"3")], "devices"),
    ([member("blk", kind=b"4")], "devices"),
    ([member("fifo", kind=b"6")], "fifos"),
    ([member("../escape", b"x")], "outside"),
    ([member("/etc/passwd", b"x")], "outside"),
    ([pax({"path": "../../escape"}), member("ok", b"x")], "outside"),
    ([pax({"GNU.sparse.map": "0,1"}), member("s", b"x")], "sparse"),
    # a negative size would take bytes off the unpacked total and desynchronise the stream
    ([pax({"size": "-1024"}), member("n", b"")], "damaged PAX header"),
    ([pax({"size": "+5"}), member("n", b"")], "damaged PAX header"),
    ([pax({"path": "a\0b"}), member("n", b"")], "NUL"),
])
def test_entries_that_could_escape_are_refused_in_any_order(tmp_path, entries, problem):
    data = gz(b"".join(entries), END)
    err = refused(data, tmp_path)
    assert problem in str(err) and err.limit is None
    assert not (tmp_path / "escape").exists()


def test_damaged_archives_say_so(tmp_path):
    good = gz(member("a", b"hello"), END)
    for data, words in ((b"garbage" * 100, "not a tar"), (good[:len(good) // 2], "truncated"),
                        (gz(member("a", b"hello")[:-512]), "truncated"), (b"\x1f\x8b" + bytes(50), "damaged")):
        assert words in str(refused(data, tmp_path)), words


def test_the_write_pass_enforces_the_limits_again(tmp_path, monkeypatch):
    """Were the first pass to miss something, the writer refuses it all the same, having made no
    more than the limit allows and nothing outside the destination."""
    monkeypatch.setattr(archive, "check", lambda data, limits: 0)
    small = Limits(dirs=50)
    with pytest.raises(ContextTooLarge, match="'dirs'"):
        archive.unpack(gz(b"".join(header(f"d{i}/", 0, b"5") for i in range(1000)), END), tmp_path / "o1", small)
    assert len(list((tmp_path / "o1").iterdir())) == 50
    with pytest.raises(ContextError, match="which is a link"):
        archive.unpack(gz(member("s", kind=b"2", link="sub"), member("s/x", b"x"), END), tmp_path / "o2")
    assert not (tmp_path / "x").exists()


def test_the_writer_never_follows_a_link_already_in_the_destination(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "sub").symlink_to(tmp_path)  # as if a racing writer had put it there
    monkeypatch.setattr(archive, "check", lambda data, limits: 0)
    with pytest.raises(ContextError, match="not a folder"):
        archive.unpack(gz(member("sub/x", b"owned"), END), dest)
    assert not (tmp_path / "x").exists()


def test_good_archives_unpack_as_before(tmp_path):
    """pack_dir's archives, tarfile's (PAX and GNU, long and non-ASCII names) and GNU tar's
    ('./' prefixes) unpack to the same tree and digest as the folder they came from."""
    src = tmp_path / "src"
    (src / "sub/deeper").mkdir(parents=True)
    (src / "sub/deeper/f.txt").write_text("deep")
    (src / ("long-" + "n" * 150)).write_text("long name")
    (src / "ünï.txt").write_text("utf-8")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "link").symlink_to("sub/deeper/f.txt")
    (src / "sub/up").symlink_to("../run.sh")
    want = ctx.digest(src)
    archives = {"pack_dir": ctx.pack_dir(src)}
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as t:
            t.add(src, arcname=".")
        archives[f"tarfile-{fmt}"] = buf.getvalue()
    if shutil.which("tar"):
        archives["gnu-tar"] = subprocess.run(["tar", "czf", "-", "-C", str(src), "."], check=True,
                                             capture_output=True).stdout
        archives["gnu-tar-plain"] = subprocess.run(["tar", "cf", "-", "-C", str(src), "."], check=True,
                                                   capture_output=True).stdout
    for what, data in archives.items():
        out = tmp_path / what
        ctx.unpack(data, out)
        assert ctx.digest(out) == want, what
        assert (out / "run.sh").stat().st_mode & 0o777 == 0o755, what
        assert os.readlink(out / "sub/up") == "../run.sh", what
    # several gzip members one after the other are one stream
    two = gz(member("a", b"1")) + gz(member("b", b"2"), END)
    ctx.unpack(two, tmp_path / "two")
    assert (tmp_path / "two/b").read_text() == "2"


def test_limits_follow_the_node_setting(tmp_path):
    data = gz(member("a", b"x" * 5000), END)
    with pytest.raises(ContextTooLarge) as exc:
        ctx.unpack(data, tmp_path / "o", limit=4096)
    assert exc.value.limit == "unpacked" and exc.value.entry == "a"
    with pytest.raises(ContextTooLarge) as exc:
        ctx.unpack(data, tmp_path / "o", limit=len(data) - 1)
    assert exc.value.limit == "packed"


# ---- through the API: POST /v1/pack/build ------------------------------------------------------


async def _post_context(rt, context: bytes):
    from tests.api.test_workloads import FORMFILE, key, signed

    body = {"formfile": FORMFILE, "context": base64.b64encode(context).decode()}
    return await signed(rt, key(5), "POST", "/v1/pack/build", body)


async def test_an_upload_over_a_limit_is_413_naming_it_and_the_node_stays_responsive(tmp_path):
    from tests.api.conftest import vm_node

    async with vm_node(tmp_path) as rt:
        bomb = gz(header("././@PaxHeader", 100 * MiB, b"x"), (b"\0", 100 * MiB), END)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            r = await _post_context(rt, bomb)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        doc = r.json()
        assert r.status_code == 413 and doc["error"] == "too_large" and doc["limit"] == "header", r.text
        assert "104857600 bytes, over the limit of 65536" in doc["detail"] and doc["entry"] == "././@PaxHeader"
        assert peak < FLAT + 4 * MiB, f"{peak / MiB:.1f} MiB allocated for the request"  # + the HTTP body
        r = await _post_context(rt, gz(b"".join(header(f"d{i:06d}/", 0, b"5") for i in range(100_000)), END))
        assert r.status_code == 413 and r.json()["limit"] == "dirs" and "d004000/" in r.json()["detail"], r.text
        assert not list((tmp_path / "vm/work").glob("*/context/*")), "a refused context was written"

        # the check runs in a worker thread: the node answers others while it works
        big = gz(b"".join(header(f"f{i:06d}") for i in range(19_000)), END)
        answered: list[float] = []

        async def health():
            import httpx
            async with httpx.AsyncClient(base_url=rt.base_url) as http:
                start = trio.current_time()
                assert (await http.get("/v1/health")).status_code == 200
                answered.append(trio.current_time() - start)

        async with trio.open_nursery() as n:
            n.start_soon(_post_context, rt, big)
            await trio.sleep(0.05)
            n.start_soon(health)
        assert answered and answered[0] < 2.0, answered


async def test_an_unsafe_upload_is_400_naming_the_entry(tmp_path):
    from tests.api.conftest import vm_node

    async with vm_node(tmp_path) as rt:
        r = await _post_context(rt, gz(member("s", kind=b"2", link="."), member("l", kind=b"2", link="s/../etc"), END))
        doc = r.json()
        assert r.status_code == 400 and doc["error"] == "bad_context" and doc["entry"] == "l", r.text
        assert doc["limit"] is None and "'..' first" in doc["detail"]
        r = await _post_context(rt, gz(member("dev", kind=b"3"), END))
        assert r.status_code == 400 and "devices are not allowed" in r.json()["detail"], r.text
