"""The zip layer of a ``torch.save`` checkpoint, with the checks torch's own reader makes.

``torch.load`` reads archives with miniz (``PyTorchStreamReader``), Python's ``zipfile`` is
more lenient in places: it accepts data prepended to the archive, ignores the entry counts
and disk numbers of the end-of-central-directory record, reads entries beyond the recorded
count, and maps a duplicated name to its last copy. An archive that torch refuses for any of
these reasons is refused here too (so the two never return different tensors from one file),
and so is one whose entries are encrypted, patched or compressed with anything but deflate
(miniz reads only stored and deflated entries; zipfile would try LZMA and bzip2).

:func:`guarded` is the one place where everything zipfile, zlib and the unpickler can raise
on a malformed file (``NotImplementedError``, ``RuntimeError``, ``UnicodeDecodeError``,
``LZMAError``, ``OverflowError``, ...) becomes a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import collections
import contextlib
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ._errors import (
    ZIP_BAD,
    ZIP_CORRUPT_ENTRY,
    ZIP_DUPLICATE,
    ZIP_NOT_ZIP_START,
    ZIP_UNREADABLE,
    CheckpointError,
    describe_error,
)

_LOCAL = struct.Struct("<4s2B4HL2L2H")
_EOCD = struct.Struct("<4s4H2LH")  # sig, disk, cd disk, entries here, entries, cd size, cd offset
_LOCATOR = struct.Struct("<4sLQL")  # sig, disk of the zip64 record, its offset, number of disks
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CD_ENTRY_SIZE = 46
_UNREADABLE_FLAGS = 0x1 | 0x20 | 0x40  # encrypted, compressed patch, strong encryption
_MASKED_DIRECTORY = 0x2000
_DOS_DIRECTORY = 0x10
_U32 = 2**32 - 1


@contextlib.contextmanager
def guarded(path: Path, template: str = ZIP_UNREADABLE) -> Iterator[None]:
    """Turn any exception but CheckpointError (and MemoryError) raised inside into a
    CheckpointError naming ``path`` (``template`` takes ``path`` and ``error``)."""
    try:
        yield
    except (CheckpointError, MemoryError):
        raise
    except RecursionError:
        raise CheckpointError(
            template.format(path=path, error="RecursionError: nested too deeply")
        ) from None
    except Exception as e:
        raise CheckpointError(template.format(path=path, error=describe_error(e))) from None


class ZipArchive:
    """An open zip archive, restricted to what torch's reader accepts (see module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":  # torch.load's own test for a zip checkpoint
            raise CheckpointError(ZIP_NOT_ZIP_START.format(path=path, head=head))
        with guarded(path, ZIP_BAD):  # BadZipFile, NotImplementedError, UnicodeDecodeError, ...
            self._zip = zipfile.ZipFile(path)
        try:
            with guarded(path, ZIP_BAD):
                self.infos = self._central_directory()
        except BaseException:
            self._zip.close()
            raise
        self.entries = {info.filename: info for info in self.infos}
        # local headers, by pread (no seek, no lock); closed with the archive
        self._heads = open(path, "rb", buffering=0)  # noqa: SIM115

    def _bad(self, problem: str) -> CheckpointError:
        return CheckpointError(ZIP_BAD.format(path=self.path, error=problem))

    def _end_records(self) -> tuple[int, int, int, int, int, int]:
        """``(disk, cd disk, entries on this disk, entries, cd size, cd offset)`` from the
        end-of-central-directory record, with the zip64 record's values where there is one."""
        with open(self.path, "rb") as f:
            tail_size = min(self.size, _EOCD.size + 0xFFFF)
            f.seek(self.size - tail_size)
            tail = f.read(tail_size)
            at = tail.rfind(b"PK\x05\x06", 0, len(tail) - _EOCD.size + 4)
            if at < 0:
                raise self._bad("no end-of-central-directory record")
            _, disk, cd_disk, here, total, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
            at += self.size - tail_size
            if at < _LOCATOR.size + _EOCD64.size:
                return disk, cd_disk, here, total, cd_size, cd_offset
            f.seek(at - _LOCATOR.size)
            sig, _, at64, disks = _LOCATOR.unpack(f.read(_LOCATOR.size))
            if sig != b"PK\x06\x07":
                return disk, cd_disk, here, total, cd_size, cd_offset
            if at64 != at - _LOCATOR.size - _EOCD64.size:  # zipfile reads it there, miniz at at64
                raise self._bad(f"the zip64 locator points at byte {at64}, not at the zip64 record")
            f.seek(at64)
            record = _EOCD64.unpack(f.read(_EOCD64.size))
        if record[0] != b"PK\x06\x06" or disks != 1:
            raise self._bad("invalid zip64 end-of-central-directory record")
        disk, cd_disk, here, total, cd_size, cd_offset = record[4:]
        if max(here, total, cd_size) > _U32:
            raise self._bad("more zip entries or central directory bytes than torch reads")
        return disk, cd_disk, here, total, cd_size, cd_offset

    def _central_directory(self) -> list[zipfile.ZipInfo]:
        disk, cd_disk, here, total, cd_size, cd_offset = self._end_records()
        infos = self._zip.infolist()
        if total != here or ((disk | cd_disk) != 0 and (disk != 1 or cd_disk != 1)):
            raise self._bad(f"multi-disk archive (disk {disk}, {here} of {total} entries here)")
        if cd_size < total * _CD_ENTRY_SIZE or cd_offset + cd_size > self.size:
            raise self._bad(f"central directory of {cd_size} bytes at {cd_offset} is invalid")
        if getattr(self._zip, "start_dir", cd_offset) != cd_offset:
            raise self._bad("bytes before the archive (its offsets are shifted)")
        if len(infos) < total:
            raise self._bad(f"the central directory holds {len(infos)} of {total} entries")
        infos = infos[:total]  # miniz reads the recorded count, zipfile every entry
        self._check_entry_sizes(cd_offset, cd_size, total)
        for info in infos:
            self._check_entry(info, disk)
        counts = collections.Counter(info.filename for info in infos)
        for name, count in counts.items():
            if count > 1:
                raise CheckpointError(ZIP_DUPLICATE.format(path=self.path, entry=name, count=count))
        return infos

    def _check_entry_sizes(self, cd_offset: int, cd_size: int, total: int) -> None:
        """Each of the first ``total`` central directory records, with its name, extra field
        and comment, must fit in the directory (zipfile silently truncates one that does not)."""
        with open(self.path, "rb") as f:
            f.seek(cd_offset)
            directory = f.read(cd_size)
        at = 0
        for _ in range(total):
            if len(directory) - at < _CD_ENTRY_SIZE or directory[at : at + 4] != b"PK\x01\x02":
                raise self._bad(f"bad central directory record at byte {cd_offset + at}")
            n, m, k = struct.unpack_from("<3H", directory, at + 28)
            start, at = at, at + _CD_ENTRY_SIZE + n + m + k
            if at > len(directory):
                raise self._bad(
                    f"the central directory record at byte {cd_offset + start} overruns it"
                )

    def _check_entry(self, info: zipfile.ZipInfo, disk: int) -> None:
        def bad(problem: str) -> CheckpointError:
            return CheckpointError(
                ZIP_CORRUPT_ENTRY.format(path=self.path, entry=info.filename, problem=problem)
            )

        stored = info.compress_type == zipfile.ZIP_STORED
        if (stored and info.file_size != info.compress_size) or (
            info.file_size and not info.compress_size
        ):
            raise bad(f"sizes {info.compress_size} (compressed) and {info.file_size} disagree")
        if info.volume == 0xFFFF or info.volume not in (disk, 1):
            raise bad(f"it is on disk {info.volume} of a multi-disk archive")
        if info.header_offset + _LOCAL.size + info.compress_size > self.size:
            raise bad(f"it would end past the end of the file ({self.size} bytes)")
        if info.flag_bits & _MASKED_DIRECTORY:
            raise bad("its central directory entry is encrypted")
        if info.filename != info.orig_filename:  # zipfile cuts a name at a NUL, miniz does not
            raise bad(f"its name {info.orig_filename!r} holds a NUL character")

    def data_start(self, info: zipfile.ZipInfo) -> int:
        """Where the entry's (possibly compressed) bytes start, after the checks torch's reader
        makes before reading an entry."""

        def bad(problem: str) -> CheckpointError:
            return CheckpointError(
                ZIP_CORRUPT_ENTRY.format(path=self.path, entry=info.filename, problem=problem)
            )

        if info.flag_bits & _UNREADABLE_FLAGS:
            raise bad(f"it is encrypted or a patch (flag bits {info.flag_bits:#06x})")
        if info.filename.endswith("/") or info.external_attr & _DOS_DIRECTORY:
            raise bad("it is marked as a directory (torch.load would read it as empty)")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise bad(
                f"compression method {info.compress_type}; torch.save checkpoints hold stored "
                "(or deflated) entries only"
            )
        head = self._local_header(info.header_offset)
        if len(head) != _LOCAL.size or head[:4] != b"PK\x03\x04":
            raise bad("bad local file header")
        fields = _LOCAL.unpack(head)
        start = info.header_offset + _LOCAL.size + fields[-2] + fields[-1]
        if start + info.compress_size > self.size:
            raise bad(
                f"its data ends at byte {start + info.compress_size}, past the end of the file "
                f"({self.size} bytes): the file is truncated"
            )
        return start

    def _local_header(self, offset: int) -> bytes:
        """The fixed part of the local file header at `offset` (one read, any thread)."""
        if hasattr(os, "pread"):
            return os.pread(self._heads.fileno(), _LOCAL.size, offset)
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(_LOCAL.size)

    def read(self, info: zipfile.ZipInfo) -> bytes:
        """The whole (decompressed) entry; zipfile checks its CRC-32."""
        if not info.compress_size:
            return b""  # torch's reader returns an empty record without looking further
        self.data_start(info)
        with guarded(self.path, _entry_template(info.filename)):
            data = self._zip.read(info)
        if len(data) != info.file_size:
            raise CheckpointError(
                ZIP_CORRUPT_ENTRY.format(
                    path=self.path,
                    entry=info.filename,
                    problem=f"it holds {len(data)} bytes, its header says {info.file_size}",
                )
            )
        return data

    def close(self) -> None:
        self._zip.close()
        self._heads.close()


def _entry_template(name: str) -> str:
    escaped = repr(name).replace("{", "{{").replace("}", "}}")
    return f"{{path}}: archive entry {escaped} is corrupted: {{error}}. Fix: download or save the file again."
