"""A throwaway pyfuse3 filesystem that proves the patched binding's new handlers are reached.

Run as ``python pyfuse3_probe.py MOUNTPOINT CALL_LOG``: it serves a root directory holding one
empty file, ``f``, until unmounted, and appends a JSON line to CALL_LOG for every fallocate,
lseek and copy_file_range request it answers. The answers are fixed and simple (not a tmpfs):
fallocate grows the size unless ``FALLOC_FL_KEEP_SIZE``; SEEK_DATA finds data from byte
``DATA_START`` on, SEEK_HOLE finds the end of the file; copy_file_range reports everything
copied. Only ``tests/test_pyfuse3_patch.py`` uses it.
"""

import errno
import json
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio

FILE_INODE = 2
FILE_NAME = b"f"
DATA_START = 4096
FALLOC_FL_KEEP_SIZE = 0x01


class ProbeFs(pyfuse3.Operations):
    """One directory with one file, logging the three requests the patch adds."""

    def __init__(self, call_log: str) -> None:
        super().__init__()
        self.call_log = call_log
        self.size_bytes = 0

    def _log(self, **call: object) -> None:
        with open(self.call_log, "a") as log:
            log.write(json.dumps(call) + "\n")

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFDIR | 0o755, 2, 0
        elif inode == FILE_INODE:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o644, 1, self.size_bytes
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_ino = inode
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def release(self, fh: int) -> None:
        pass

    async def flush(self, fh: int) -> None:
        pass

    async def fallocate(
        self, inode: int, fh: int, mode: int, off: int, length: int, ctx: Any
    ) -> None:
        self._log(op="fallocate", inode=inode, fh=fh, mode=mode, off=off, length=length)
        if not mode & FALLOC_FL_KEEP_SIZE:
            self.size_bytes = max(self.size_bytes, off + length)

    async def lseek(self, inode: int, fh: int, off: int, whence: int, ctx: Any) -> int:
        self._log(op="lseek", inode=inode, fh=fh, off=off, whence=whence)
        if off >= self.size_bytes:
            raise pyfuse3.FUSEError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            if self.size_bytes <= DATA_START:
                raise pyfuse3.FUSEError(errno.ENXIO)
            return max(off, DATA_START)
        return self.size_bytes

    async def copy_file_range(
        self,
        inode_in: int,
        fh_in: int,
        off_in: int,
        inode_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
        ctx: Any,
    ) -> int:
        self._log(
            op="copy_file_range",
            inode_in=inode_in,
            fh_in=fh_in,
            off_in=off_in,
            inode_out=inode_out,
            fh_out=fh_out,
            off_out=off_out,
            length=length,
            flags=flags,
        )
        return length


def main() -> None:
    mountpoint, call_log = sys.argv[1:]
    pyfuse3.init(ProbeFs(call_log), mountpoint, {"fsname=pyfuse3-probe", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
