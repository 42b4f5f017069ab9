"""Write-behind for a file written front to back: start the disk writes while the data is produced.

A plain ``write`` only dirties the page cache. The kernel starts writing back late (at
``vm.dirty_background_ratio``, gigabytes on a large machine) and the closing ``fsync`` then waits
for most of the file. Linux's ``sync_file_range`` lets the writer start each window of the file as
soon as it is complete and wait for windows well behind it, so the disk works while the converter
does, the dirty data in the page cache stays bounded (``LAG`` windows) and the final ``fsync`` has
only the last windows left. The file's bytes are not affected. Elsewhere (no ``sync_file_range``) a
no-op.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

WINDOW = 64 << 20
"""Bytes per ``sync_file_range`` call."""
LAG = 4
"""Windows between starting a window's writeback and waiting for it to finish."""

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # <linux/fs.h> SYNC_FILE_RANGE_*
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP)


def _sync_file_range():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


class WriteBehind:
    """Call ``advance(n)`` after writing ``n`` more bytes to ``fd`` (starting at ``start``); one thread only.

    A write error the kernel reports here (EIO, ENOSPC) is raised as ``OSError``: once reported, a
    later ``fsync`` would no longer see it.
    """

    def __init__(self, fd: int, start: int = 0) -> None:
        self.fd, self.started, self.end = fd, start, start
        self.enabled = _SYNC_FILE_RANGE is not None

    def advance(self, nbytes: int) -> None:
        self.end += nbytes
        while self.enabled and self.end - self.started >= WINDOW:
            self._sync(self.started, _WRITE)
            if self.started >= LAG * WINDOW:
                self._sync(self.started - LAG * WINDOW, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            self.started += WINDOW

    def _sync(self, offset: int, flags: int) -> None:
        if not self.enabled or _SYNC_FILE_RANGE(self.fd, offset, WINDOW, flags) == 0:
            return
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:  # not for this file (a pipe, a filter that refuses it): plain writes
            self.enabled = False
            return
        raise OSError(err, os.strerror(err))


__all__ = ["LAG", "WINDOW", "WriteBehind"]
