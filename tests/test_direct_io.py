"""Checkpoint files written and hashed past the page cache hold exactly the bytes given, at any
length and in any pieces, and fall back to buffered I/O where the file system refuses O_DIRECT."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from zhilu.training import direct_io
from zhilu.training.direct_io import ALIGN, BUFFER, DirectWriter, sha256_direct

LENGTHS = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, BUFFER - 1, BUFFER, BUFFER + 1, 2 * BUFFER + 3 * ALIGN + 7]


def _write_in_pieces(path: Path, data: bytes, seed: int) -> DirectWriter:
    rng = random.Random(seed)
    with DirectWriter(path) as out:
        at = 0
        while at < len(data):
            n = rng.choice([1, 7, ALIGN, 3 * ALIGN + 5, BUFFER + 11])
            assert out.write(memoryview(data)[at:at + n]) == len(data[at:at + n])
            at += n
            assert out.tell() == min(at, len(data))
    return out


@pytest.mark.parametrize("length", LENGTHS)
def test_the_file_holds_exactly_the_bytes_written_in_any_pieces(tmp_path: Path, length: int) -> None:
    data = random.Random(length).randbytes(length)
    path = tmp_path / "f.bin"
    _write_in_pieces(path, data, seed=length)
    assert path.read_bytes() == data
    assert sha256_direct(path) == hashlib.sha256(data).hexdigest()


def test_a_checkpoint_directory_on_this_machine_is_written_direct(tmp_path: Path) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("this platform has no O_DIRECT")
    out = DirectWriter(tmp_path / "f.bin")
    out.close()
    assert out.direct, f"{tmp_path} refused O_DIRECT; the test's premise is a file system that takes it"


def test_a_file_system_without_o_direct_is_written_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Opened with O_DIRECT, the write is refused with EINVAL, as file systems that accept the
    # flag but not unaligned or direct writes do: the writer clears the flag and goes on.
    real_write = os.write

    def refuse_direct(fd: int, data: bytes) -> int:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", refuse_direct)
    data = random.Random(1).randbytes(BUFFER + 5)
    out = _write_in_pieces(tmp_path / "f.bin", data, seed=1)
    assert (tmp_path / "f.bin").read_bytes() == data
    if hasattr(os, "O_DIRECT"):
        assert not out.direct
