"""Quantized in, quantized out: which of a checkpoint's ``QuantTensor``s a writer keeps quantized, in which
block layout, and their stored tensors — recoded from the source's codes, never re-quantized
(``quant/transcode.py``), one tensor at a time as the writer asks for it.

Targets: ``mlx`` (affine, the source's width and group), ``hf`` (compressed-tensors pack-quantized: sym stays
sym, asym and affine become asym), ``gguf`` (the ``--type`` when it is a 32-block type: Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1; a GGUF K-quant tensor whose type the ``--type`` stores it as is copied byte for byte). A group the
target cannot hold exactly is counted with its error; the write then fails listing them all, unless
``requantize`` (those groups re-quantized by min/max RTN from the source's dequantized values).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gemma2_convert.core.errors import UnsupportedError
from gemma2_convert.core.lazy import LazyTensor
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.formats.registry import Checkpoint
from gemma2_convert.formats.tolerance import Tolerance
from quant.compressed_tensors import pack_quantized
from quant.gguf_blocks import BLOCK_TYPES
from quant.gguf_kcodes import K_TYPES
from quant.gguf_types import ggml_type
from quant.mlx_affine import MLX_BITS, MLX_GROUP_SIZES, pack_stream
from quant.pack import pack_int32, pack_unsigned
from quant.qtensor import QuantCodes, QuantTensor
from quant.spec import GROUP_SIZES, QuantSpec
from quant.transcode import Recoded, Target, recode, requantize_bad


class TranscodeError(UnsupportedError):
    """Some groups cannot be held exactly by the target and ``--requantize`` was not given."""


@dataclass
class TensorReport:
    name: str
    source: str
    target: str
    groups: int
    bad_groups: int
    max_error: float


@dataclass
class TranscodePlan:
    """The tensors a writer keeps quantized, and the record of how exactly each was moved."""

    targets: dict[str, Target]
    sources: dict[str, QuantTensor]
    requantize: bool = False
    scale: dict[str, float] = field(default_factory=dict)
    """A factor folded into a tensor's scale (GGUF's query fold), 1.0 when absent."""
    reports: list[TensorReport] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    _last: tuple[str, QuantCodes] | None = None
    _read: tuple[str, QuantCodes] | None = None
    _packed: tuple[str, dict[str, Tensor]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def source_codes(self, name: str) -> QuantCodes:
        """The source's codes of ``name``, read once for both the decoded source a writer checks and the recode."""
        if self._read is None or self._read[0] != name:
            self._read = (name, self.sources[name].codes())  # type: ignore[misc]
        return self._read[1]

    def decoded(self, name: str) -> LazyTensor:
        """``name`` as the source decodes it (its ``load()``), from the codes ``recoded`` then reuses."""
        qt = self.sources[name]
        return LazyTensor(qt.shape, qt.dtype, lambda: self.source_codes(name).dequantize().to(qt.dtype),
                          None, qt.prefetch)

    def recoded(self, name: str) -> QuantCodes:
        """Tensor ``name`` in its target layout (the latest one is kept for its sibling tensors)."""
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        codes = self.recode(name, self.source_codes(name))
        self._last = (name, codes)
        return codes

    def recode(self, name: str, src: QuantCodes) -> QuantCodes:
        """``src`` (tensor ``name``'s source codes) in its target layout, its exactness recorded; no cache, so
        several tensors may be recoded at once on different threads."""
        t = self.targets[name]
        fold = self.scale.get(name, 1.0)
        if fold != 1.0:
            # kept in float64: the exactness check then sees the folded values themselves, not a rounding of them
            off = src.offset if src.offset is None or src.kind != "affine" else src.offset.double() * fold
            src = QuantCodes(src.u, src.scale.double() * fold, off, src.kind, src.bits)
        r: Recoded = recode(src, t, name)
        if r.bad_groups and self.requantize:
            r = requantize_bad(r, src, t)
        with self._lock:
            self.reports.append(TensorReport(name, self.sources[name].label, t.name, r.groups, r.bad_groups,
                                             r.max_error))
            self._summarize()
        return r.codes

    def copied(self, name: str) -> Tensor:
        """A GGUF K-quant kept in its own type: its block bytes as stored, recorded as exact (the same
        bytes, so the same codes and scales)."""
        qt, t = self.sources[name], self.targets[name]
        raw = qt.blocks()  # type: ignore[misc]
        report = TensorReport(name, qt.label, t.name, qt.numel // t.group_size, 0, 0.0)
        with self._lock:
            self.reports.append(report)
            self._summarize()
        return raw

    def _summarize(self) -> None:
        bad = sorted((r for r in self.reports if r.bad_groups), key=lambda r: r.name)  # tensors finish in any order
        self.details["transcoded"] = len(self.reports)
        self.details["groups"] = sum(r.groups for r in self.reports)
        self.details["inexact_groups"] = sum(r.bad_groups for r in self.reports)
        self.details["inexact_tensors"] = [(r.name, r.bad_groups, r.groups, r.max_error) for r in bad]
        self.details["requantized"] = self.requantize and bool(bad)

    def finish(self) -> None:
        """Raise when groups were inexact and ``requantize`` is off (after all were counted)."""
        bad = sorted((r for r in self.reports if r.bad_groups), key=lambda r: r.name)
        if bad and not self.requantize:
            n, total = sum(r.bad_groups for r in bad), sum(r.groups for r in self.reports)
            worst = max(bad, key=lambda r: r.max_error)
            listing = ", ".join(f"{r.name} ({r.bad_groups}/{r.groups})" for r in bad[:8])
            raise TranscodeError(
                f"{n} of {total} quantization groups cannot be held exactly by {worst.target} "
                f"({len(bad)} tensors: {listing}{', …' if len(bad) > 8 else ''}; largest error "
                f"{worst.max_error:.3g} in {worst.name}); pass --requantize to re-quantize those groups, "
                "or pick a target type whose blocks hold the source's")

    def tolerance(self) -> Tolerance:
        """Exact when every kept tensor decodes by its source's own rule in its source's dtype (sym/asym
        ``(u - z)·s`` to sym/asym, affine ``s·u + b`` to affine); otherwise the values are the same numbers but
        a decoder rounds them differently (≤ 1 ulp), so only the logits are bounded, tightly."""
        if self.requantize:
            return Tolerance.lossy(0.05, 0.9, min_sqnr_db=10.0).because("--requantize: some groups re-quantized")
        same = all((t.kind == "affine") == (self.sources[n].kind == "affine") and t.compute_dtype == self.sources[n].dtype
                   for n, t in self.targets.items())
        if same:
            return Tolerance().because("a lossless transcode: the same codes and scales")
        narrow = {self.sources[n].dtype for n, t in self.targets.items()
                  if self.sources[n].dtype in HALF_TYPES and t.compute_dtype != self.sources[n].dtype}
        if narrow:  # the source's decoder rounds each value to 16 bits, the target's does not
            half = ggml_type(HALF_TYPES[min(narrow, key=lambda d: torch.finfo(d).eps)])
            return Tolerance.lossy(*half.lossy_bound, min_sqnr_db=half.min_sqnr_db).because(
                f"a lossless transcode: the same numbers, but the source decodes them in {half.name} and the "
                f"target in float32, so the source's values are the target's rounded to {half.name}")
        return Tolerance.lossy(1e-6, 0.99, 1e-3, 60.0).because("a lossless transcode decoded by another rule")

    def params(self) -> dict[str, tuple[int, int]]:
        return {n.removesuffix(".weight"): (t.bits, t.group_size) for n, t in self.targets.items()}

    def items(self) -> dict[str, LazyTensor]:
        """MLX: ``weight`` (uint32), ``scales``, ``biases`` per kept tensor."""
        out: dict[str, LazyTensor] = {}
        for name, t in self.targets.items():
            prefix, (rows, cols) = name.removesuffix(".weight"), self.sources[name].shape
            groups = (rows, cols // t.group_size)
            out[f"{prefix}.weight"] = LazyTensor((rows, cols * t.bits // 32), torch.uint32,
                                                 lambda n=name: _mlx_words(self.recoded(n)))
            out[f"{prefix}.scales"] = LazyTensor(groups, t.scale_dtype,
                                                 lambda n=name, d=t.scale_dtype: self.recoded(n).scale.to(d))
            out[f"{prefix}.biases"] = LazyTensor(groups, t.scale_dtype,
                                                 lambda n=name, d=t.scale_dtype: self.recoded(n).offset.to(d))
        return out

    def compressed(self, name: str) -> dict[str, Tensor]:
        """compressed-tensors: the pack-quantized tensors of one kept tensor (the latest one kept: the writer asks
        for each of its parts in turn)."""
        if self._packed is None or self._packed[0] != name:
            self._packed = (name, self._pack(name))
        return self._packed[1]

    def _pack(self, name: str) -> dict[str, Tensor]:
        c, t = self.recoded(name), self.targets[name]
        half = 1 << (t.bits - 1)
        q = (c.u ^ half).view(torch.int8) if t.bits == 8 else c.u.view(torch.int8) - half  # u - 2^(b-1), in int8
        zero = None if c.offset is None else (c.offset.to(torch.int16) - half).to(torch.int8)
        spec = QuantSpec(t.bits, t.group_size, t.kind == "sym")
        return pack_quantized(name.removesuffix(".weight"), q, c.scale.to(t.scale_dtype), zero, spec)


HALF_TYPES = {torch.bfloat16: "BF16", torch.float16: "F16"}
"""16-bit decode dtypes, by the ggml float type whose bounds (``lossy_bound``, ``min_sqnr_db``) rounding to them has."""

def _mlx_words(c: QuantCodes) -> Tensor:
    if 32 % c.bits:
        return pack_stream(c.u, c.bits)
    if c.bits in (4, 8) and sys.byteorder == "little":
        return pack_unsigned(c.u, c.bits).view(torch.uint32)
    signed = (c.u.to(torch.int16) - (1 << (c.bits - 1))).to(torch.int8)
    return pack_int32(signed, c.bits, packed_dim=1).view(torch.uint32)


def target_for(fmt: str, name: str, qt: QuantTensor, opts: ConvertOptions,
               chosen: str | None = None) -> Target | None:
    """The layout ``fmt`` keeps ``qt`` in, or None to write it dequantized (under ``quantized='keep'`` a source
    the target has no form for is an error instead); ``chosen``: the ggml type a GGUF ``--type`` stores it
    as."""
    t, why = _target(fmt, name, qt, opts, chosen)
    if t is None and why and opts.quantized == "keep":
        raise UnsupportedError(f"{name}: {qt.label} {why}; pass --quantized dequantize to write it as floats")
    return t


def _target(fmt: str, name: str, qt: QuantTensor, opts: ConvertOptions,
            chosen: str | None) -> tuple[Target | None, str]:
    if fmt == "mlx":
        if qt.bits not in MLX_BITS or qt.group_size % 32:
            why = (f"has groups of {qt.group_size}, each with its own scale, and mlx quantizes groups of "
                   f"{', '.join(map(str, MLX_GROUP_SIZES))} only" if qt.group_size % 32 else
                   f"has no MLX form (bits {list(MLX_BITS)})")
            return None, why
        group = qt.group_size if qt.group_size in MLX_GROUP_SIZES else 32   # a g256 source splits exactly
        return Target("affine", qt.bits, group, qt.dtype, qt.dtype, "mlx"), ""
    if fmt == "hf":
        if "embed" in name or "lm_head" in name:
            return None, ""  # compressed-tensors keeps Gemma 2's tied embedding dense (quant.compressed_tensors)
        if qt.bits not in (4, 8) or qt.group_size not in GROUP_SIZES:
            return None, f"has no compressed-tensors form here (int4/int8, groups {list(GROUP_SIZES)})"
        kind = "sym" if qt.kind == "sym" else "asym"
        return Target(kind, qt.bits, qt.group_size, qt.dtype, qt.dtype, "compressed-tensors"), ""
    qtype = opts.gguf_type.upper()
    source = qt.layout.removeprefix("gguf:")
    if fmt == "gguf" and source in K_TYPES:
        if chosen == source and qt.blocks is not None:  # the same type: the stored bytes, copied
            return Target(qt.kind, qt.bits, qt.group_size, torch.float32, torch.float32, qt.layout), ""
        if qtype not in BLOCK_TYPES:
            return None, (f"is kept only in its own type (a K-quant's scales are not split back into "
                          f"super-block and sub-block parts), and --type {opts.gguf_type} stores it as "
                          f"{chosen or qtype}")
    if fmt != "gguf" or qtype not in BLOCK_TYPES:
        return None, f"cannot be kept in GGUF {qtype} (block types: {', '.join(BLOCK_TYPES)})"
    kind, bits = BLOCK_TYPES[qtype]
    if bits != qt.bits or qt.group_size % 32:
        return None, f"cannot become {qtype} blocks ({bits}-bit, groups of 32) without re-quantizing"
    return Target(kind, bits, 32, torch.float16, torch.float32, f"gguf:{qtype}"), ""


def plan_transcode(ckpt: Checkpoint, fmt: str, opts: ConvertOptions, progress: Progress,
                   scale: dict[str, float] | None = None,
                   gguf_types: dict[str, str] | None = None) -> TranscodePlan:
    """Which tensors of ``ckpt`` the ``fmt`` writer keeps quantized (``opts.quantized``: auto keeps them for
    mlx and for a GGUF block ``--type``, keep forces it for hf, dequantize never keeps any); ``gguf_types``:
    the ggml type the ``--type`` stores each tensor as (a K-quant tensor already of that type is copied)."""
    keep = opts.quantized == "keep" or (opts.quantized == "auto" and fmt in ("mlx", "gguf"))
    quant = {n: t for n, t in ckpt.tensors.items() if isinstance(t, QuantTensor) and t.codes is not None}
    targets: dict[str, Target] = {}
    for name, qt in quant.items() if keep else ():
        t = target_for(fmt, name, qt, opts, (gguf_types or {}).get(name))
        if t is not None:
            targets[name] = t
    dense = sorted(set(quant) - set(targets))
    if dense and keep:
        progress.warn(f"{len(dense)} quantized tensors are written dequantized for {fmt} (e.g. {dense[0]})")
    return TranscodePlan(targets, {n: quant[n] for n in targets}, opts.requantize, dict(scale or {}))
