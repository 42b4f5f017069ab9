"""``torch.save`` zip archives: safe memory-mapped loading, a cheap fingerprint, a CRC check.

Loading uses only ``torch.load(mmap=True, weights_only=True)``: tensors are views of the mapped file
(nothing is read until used), and a pickle that references code (``GLOBAL os.system`` …) is refused
by the restricted unpickler, never run. Every failure becomes one FormatError naming the file.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from gemma2_convert.core.errors import FormatError

ZIP_MAGIC = b"PK\x03\x04"


def is_torch_zip(p: Path) -> bool:
    """A zip archive with a ``data.pkl`` record (what ``torch.save`` writes since torch 1.6)."""
    try:
        with open(p, "rb") as f:
            if f.read(4) != ZIP_MAGIC:
                return False
        with zipfile.ZipFile(p) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _load_error(path: Path, e: Exception) -> FormatError:
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in msg:
        detail = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln), "")
        if detail:
            return FormatError(f"refused: the pickle references code ({detail}); only tensors are read, "
                               "nothing in the file was run", path)
        return FormatError("corrupt pickle inside the checkpoint (truncated or damaged file)", path)
    if "failed finding central directory" in msg or "failed reading zip archive" in msg:
        return FormatError("truncated or corrupt zip archive (an incomplete download?)", path)
    missing = re.search(r"failed locating file (\S+): file not found", msg)
    if missing:
        return FormatError(f"the archive lacks the record {missing.group(1)} that its pickle refers to (an "
                           "incomplete or damaged file)", path)
    return FormatError(f"corrupt checkpoint ({type(e).__name__}: {msg.splitlines()[0][:200]})", path)


def load(path: Path) -> object:
    """The unpickled object, its tensors mmap'd; bad, legacy or code-carrying files → FormatError."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != ZIP_MAGIC:
        if head[:1] == b"\x80":
            raise FormatError("legacy (pre-zip) torch.save format cannot be memory-mapped; re-save it with "
                              "torch.save(torch.load(path, weights_only=True), path) on a machine with enough RAM",
                              path)
        raise FormatError(f"not a gemma_pytorch checkpoint: expected a torch.save zip archive, file starts with "
                          f"{head!r}", path)
    if not is_torch_zip(path):
        try:
            zipfile.ZipFile(path).close()
        except (OSError, zipfile.BadZipFile):
            raise FormatError("truncated or corrupt zip archive (an incomplete download?)", path) from None
        raise FormatError("a zip archive without a data.pkl record: not a torch.save checkpoint", path)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/ValueError/… for bad archives
        raise _load_error(path, e) from None


def fingerprint(path: Path) -> str:
    """sha256 of the zip central directory, which lists every record's CRC-32: changes with any byte of
    data, costs one small read."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        f.seek(z.start_dir)
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def check_integrity(files: list[Path]) -> None:
    """Re-read every record and compare its CRC-32 with the archive's (catches flipped data bytes)."""
    for path in files:
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    with z.open(info) as rec:
                        while rec.read(1 << 24):
                            pass
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise FormatError(f"corrupt data ({e})", path) from None
