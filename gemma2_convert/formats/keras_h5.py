"""Keras 3 weights files read with h5py alone — keras, TensorFlow and JAX are never imported.

``model.weights.h5`` is plain HDF5: one group per object that owns variables, each variable a dataset
``<object path>/vars/<n>``. A sharded save has ``model.weights.json`` instead, whose ``weight_map`` gives
each ``/<object path>/vars`` group's file(s) (``model_00000.weights.h5``, …) beside it. bfloat16 variables
are 2-byte opaque datasets with the attribute ``dtype = "bfloat16"`` (keras ``saving_lib.H5IOStore``),
reinterpreted bit for bit as ``torch.bfloat16``.

Files are listed when opened (names, shapes, dtypes, where the bytes lie: nothing read) and each variable is
read on ``load()``, one at a time, so nothing stays open or in memory between tensors. A variable stored as
plain little-endian bytes (contiguous, unfiltered: how Keras saves) is a zero-copy view of a private mmap of
its file, like a safetensors tensor; any other (chunked, compressed, big-endian) is read through h5py.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma2_convert.core.errors import FormatError, UnsupportedError, name_list
from gemma2_convert.core.lazy import LazyTensor, Shape

MAGIC = b"\x89HDF\r\n\x1a\n"
SINGLE = "model.weights.h5"
SHARDED = "model.weights.json"
INSTALL = "reading Keras weights needs h5py: pip install 'gemma2-convert[keras]'"
FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def h5py_module(where: Path | None = None) -> Any:
    """The h5py module, imported on first use (an optional extra, like tensorstore for Orbax)."""
    try:
        import h5py  # deferred: an optional extra, needed only when a Keras file is read
    except ImportError:
        raise UnsupportedError(INSTALL, where) from None
    return h5py


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def open_file(path: Path) -> Any:
    """``h5py.File(path, "r")``; FormatError when it is not HDF5 or is cut short."""
    h5py = h5py_module(path)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        with open(path, "rb") as f:
            head = f.read(8)
        what = ("the HDF5 file is damaged or truncated (interrupted download or save?)" if head == MAGIC
                else "not an HDF5 file")
        raise FormatError(f"cannot open: {what} (h5py: {_first_line(e)})", path) from None


@dataclass(frozen=True)
class H5Variable:
    """One dataset of a Keras weights file, listed but not read."""

    name: str
    """Its path in the file, e.g. ``layers/gemma_decoder_block_1/attention/query_dense/vars/0``."""
    file: Path
    shape: Shape
    type: str
    """numpy's name of the stored dtype (``float32``, ``int8``, …), or ``bfloat16``."""
    itemsize: int
    offset: int | None = None
    """Where its bytes start in ``file`` when they lie there as they are (``plain_offset``); None: read them
    through h5py."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def dtype(self) -> torch.dtype | None:
        """The torch dtype it reads as; None for a type the reader does not take (int8, float64, …)."""
        return FLOATS.get(self.type)

    def lazy(self) -> LazyTensor:
        assert self.dtype is not None, f"{self.name}: {self.type} is not a float type this reader takes"
        return LazyTensor(self.shape, self.dtype, self.read, prefetch=None if self.offset is None else self.prefetch)

    def read(self) -> torch.Tensor:
        return self._read_h5py() if self.offset is None or self.nbytes == 0 else self._mapped(self.offset)

    def prefetch(self) -> None:
        """Start reading the variable's bytes into the page cache (``posix_fadvise(WILLNEED)``); a hint."""
        if self.offset is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, self.offset, self.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _mapped(self, offset: int) -> torch.Tensor:
        """A view of a private mmap of the file (ACCESS_COPY: writable for torch, never written back)."""
        with open(self.file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset + self.nbytes > size:  # mapped pages past the end would be a SIGBUS, not an error
                raise FormatError(f"variable {self.name} ends at byte {offset + self.nbytes}, past the end of the "
                                  f"file ({size} bytes): the file is truncated", self.file)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=self.nbytes, offset=offset)
        if raw.data_ptr() % self.itemsize:
            raw = raw.clone()  # unaligned: copy rather than hand kernels a misaligned pointer
        assert self.dtype is not None
        return raw.view(self.dtype).reshape(self.shape)

    def _read_h5py(self) -> torch.Tensor:
        try:
            with open_file(self.file) as f:
                arr = np.asarray(f[self.name][()])
        except (OSError, KeyError, ValueError) as e:  # h5py raises OSError for data cut short
            raise FormatError(f"cannot read variable {self.name} ({_first_line(e)}); the file is damaged or "
                              "truncated", self.file) from None
        if self.type == "bfloat16":  # 2-byte opaque → the same bits (arr is ours: no copy)
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("=")))


def _type(ds: Any) -> str:
    if ds.attrs.get("dtype") == "bfloat16" and ds.dtype.itemsize == 2:
        return "bfloat16"
    return ds.dtype.name


def plain_offset(ds: Any) -> int | None:
    """The byte offset of a dataset whose bytes lie in its file as a little-endian array of its shape
    (contiguous, no filters, no external storage), else None."""
    little = ds.dtype.byteorder in "<|" or (ds.dtype.byteorder == "=" and sys.byteorder == "little")
    if sys.byteorder != "little" or not little or ds.chunks is not None or ds.external:
        return None
    offset = ds.id.get_offset()
    return offset if offset is not None and ds.id.get_storage_size() == ds.nbytes else None


def _datasets(f: Any, fn: Path) -> list[H5Variable]:
    found: list[H5Variable] = []

    def visit(name: str, obj: Any) -> None:
        if hasattr(obj, "dtype") and hasattr(obj, "shape"):  # an h5py.Dataset
            found.append(H5Variable(name, fn, tuple(int(x) for x in obj.shape), _type(obj), obj.dtype.itemsize,
                                    plain_offset(obj)))

    f.visititems(visit)
    return found


def list_variables(files: list[Path]) -> dict[str, H5Variable]:
    """Every dataset of the files, by path; FormatError for a file that is not Keras 3's layout."""
    out: dict[str, H5Variable] = {}
    for fn in files:
        with open_file(fn) as f:
            if "model_weights" in f or "layer_names" in f.attrs:
                raise FormatError("a Keras 2 (legacy HDF5) weights file; KerasHub presets use Keras 3's "
                                  f"{SINGLE} layout (<layer path>/vars/<n>)", fn)
            found = _datasets(f, fn)
        stray = [v.name for v in found if "/vars/" not in f"/{v.name}"]
        if stray:
            raise FormatError(f"not a Keras weights file: dataset(s) outside any <layer path>/vars/ group: "
                              f"{name_list(stray, 5)}", fn)
        twice = [v.name for v in found if v.name in out]
        if twice:
            raise FormatError(f"variable(s) stored in more than one shard: {name_list(twice, 5)}", fn)
        out.update({v.name: v for v in found})
    if not out:
        raise FormatError("holds no variables: not a Keras weights file, or an empty one", files[0])
    return out


def shard_files(index: Path) -> list[Path]:
    """The shard files ``model.weights.json``'s ``weight_map`` names (checked to exist beside it)."""
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
        values = list(obj["weight_map"].values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"not a Keras sharded-weights map ({type(e).__name__}: {e})", index) from None
    names = sorted({n for v in values for n in (v if isinstance(v, list) else [v])}, key=str)
    bad = [str(n) for n in names if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith(".")]
    missing = [n for n in names if n not in bad and not (index.parent / n).is_file()]
    if bad or missing or not names:
        raise FormatError(f"weight_map names shard(s) outside the directory or missing: {bad + missing}", index)
    return [index.parent / n for n in names]
