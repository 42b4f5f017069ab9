"""compressed-tensors ``pack-quantized`` layout: the tensors of one quantized Linear, and config.json.

Per quantized module ``<prefix>`` (e.g. ``model.layers.0.mlp.down_proj``), as compressed-tensors
0.20.0 writes them (``PackedQuantizationCompressor.compress`` in
compressed_tensors/compressors/pack_quantized/base.py; packing in ``pack_quantized/helpers.py``):

====================================  =========  ==============================  ==========================
name                                  dtype      shape                           content
====================================  =========  ==============================  ==========================
``<prefix>.weight_packed``            int32      ``[out, ceil(in·b/32)]``        codes + 2^(b-1), packed along ``in``
``<prefix>.weight_scale``             weight's   ``[out, in/g]`` (``[out, 1]``    per group (channel) scale
                                      dtype      per channel)
``<prefix>.weight_zero_point``        int32      ``[ceil(out·b/32), in/g]``      asymmetric only: int8 zero-points
                                                                                 + 2^(b-1), packed along ``out``
``<prefix>.weight_shape``             int64      ``[2]``                         ``[out, in]``
====================================  =========  ==============================  ==========================

The scale dtype is the weight's dtype (``initialize_qparams``, quantization/lifecycle/initialize.py);
the zero-point is int8 before packing (``QuantizationArgs.zp_dtype`` → ``pytorch_dtype()``);
``weight_shape`` is ``torch.tensor(weight.shape)``, hence int64. Symmetric schemes store no
zero-point. Decode: ``(q - zero) · scale`` in the scale dtype (``quant/qparams.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gemma2_convert.core.errors import FormatError, UnsupportedError
from quant.methods import quantize_weight
from quant.pack import pack_int32, unpack_int32, unpack_unsigned
from quant.qparams import dequantize
from quant.qtensor import QuantCodes
from quant.spec import QuantSpec

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.0"
"""The compressed-tensors release whose layout and config keys this module reproduces."""
UNQUANTIZED_MODULES = ("model.embed_tokens", "lm_head")
"""Gemma 2's tied embedding/output head: always left dense here (``lm_head`` is in ``ignore``)."""


def _words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_quantized(prefix: str, q: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> dict[str, Tensor]:
    """The stored tensors for codes ``q [out, in]`` int8, ``scale [out, G]``, ``zero [out, G]`` int8 or None."""
    out_f, in_f = q.shape
    tensors = {
        f"{prefix}.weight_packed": pack_int32(q, spec.bits, packed_dim=1),          # [out, in·b/32]
        f"{prefix}.weight_scale": scale.contiguous(),                               # [out, G]
        f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not spec.symmetric:
        if zero is None:
            raise ValueError(f"{prefix}: an asymmetric spec needs zero-points")
        tensors[f"{prefix}.weight_zero_point"] = pack_int32(zero, spec.bits, packed_dim=0)  # [out·b/32, G]
    return tensors


def compress_weight(
    prefix: str, w: Tensor, spec: QuantSpec, *, hessian: Tensor | None = None,
    importance: Tensor | None = None, **options: Any,
) -> dict[str, Tensor]:
    """Quantize ``w [out, in]`` with ``spec.method`` and return its ``pack-quantized`` tensors."""
    q, scale, zero = quantize_weight(
        w, spec, name=f"{prefix}.weight", hessian=hessian, importance=importance, **options
    )
    return pack_quantized(prefix, q, scale, zero, spec)


def weights_args(spec: QuantSpec) -> dict[str, Any]:
    """``QuantizationArgs`` for the weights, with the keys compressed-tensors itself serializes."""
    return {
        "num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
        "group_size": spec.group_size, "strategy": spec.strategy, "dynamic": False,
    }


def _scheme(targets: list[str], spec: QuantSpec) -> dict[str, Any]:
    return {
        "targets": targets, "weights": weights_args(spec),
        "input_activations": None, "output_activations": None, "format": None,
    }


def quantization_config(spec_by_module: Mapping[str, QuantSpec | None]) -> dict[str, Any]:
    """config.json ``quantization_config`` for a model whose Linear modules map to a spec or None.

    ``spec_by_module`` must list *every* Linear module except ``lm_head`` (names without
    ``.weight``), None for the ones kept dense: with a single scheme the group targets the
    class ``Linear``, so an unlisted Linear would be expected in packed form by the loader.
    Modules whose specs differ only in ``method`` share a group (the method is not stored).
    """
    groups: dict[tuple[int, int | None, bool], list[str]] = {}
    for name, spec in spec_by_module.items():
        if spec is not None and name in UNQUANTIZED_MODULES:
            raise UnsupportedError(
                f"{name}: the compressed-tensors output keeps Gemma 2's tied embedding/output head dense; "
                "use embedding='keep' for this format"
            )
        if spec is not None:
            groups.setdefault((spec.bits, spec.group_size, spec.symmetric), []).append(name)
    if not groups:
        raise UnsupportedError("no module is quantized; write a plain checkpoint instead")
    keep = sorted(n for n, s in spec_by_module.items() if s is None and n not in UNQUANTIZED_MODULES)
    single = len(groups) == 1
    config_groups = {
        f"group_{i}": _scheme(["Linear"] if single else sorted(names), QuantSpec(*key))
        for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0])))
    }
    return {
        "config_groups": config_groups, "format": FORMAT, "global_compression_ratio": None,
        "ignore": ["lm_head", *keep], "kv_cache_scheme": None, "quant_method": QUANT_METHOD,
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        "version": CT_VERSION,
    }


def _name_matches(name: str, target: str) -> bool:
    """compressed-tensors ``match_name``: ``re:`` prefix = regex from the start, else exact."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _pick_group(qconfig: Mapping[str, Any], module: str) -> tuple[str, Mapping[str, Any]] | None:
    """The config group compressed-tensors gives Linear ``module`` (``match_targets`` +
    ``_scheme_from_targets``, quantization/lifecycle/apply.py): exact names first, then regexes
    (each sorted), then the class name ``Linear``; a target listed twice belongs to the later group."""
    by_target: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for gname, group in (qconfig.get("config_groups") or {}).items():
        for t in group.get("targets", []):
            by_target[t] = (gname, group)
    ordered = sorted(by_target, key=lambda t: ("re:" in t, t))
    hits = [t for t in ordered if _name_matches(module, t)] + [t for t in ordered if t == "Linear"]
    return by_target[hits[0]] if hits else None


def spec_for_module(qconfig: Mapping[str, Any], module: str) -> QuantSpec | None:
    """The ``QuantSpec`` a ``quantization_config`` assigns to Linear ``module``, or None if dense."""
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"quant_method is {qconfig.get('quant_method')!r}, expected {QUANT_METHOD!r}")
    if any(_name_matches(module, t) or t == "Linear" for t in qconfig.get("ignore") or []):
        return None
    picked = _pick_group(qconfig, module)
    if picked is None:
        return None
    gname, group = picked
    fmt = group.get("format") or qconfig.get("format")
    if fmt != FORMAT:
        raise UnsupportedError(f"{module}: format {fmt!r} in {gname}; only {FORMAT!r} is supported")
    return _spec_from_args(module, group.get("weights") or {})


def _spec_from_args(module: str, args: Mapping[str, Any]) -> QuantSpec:
    """A ``QuantSpec`` from serialized ``QuantizationArgs``; rejects what ``read_compressed`` cannot decode."""
    strategy = args.get("strategy")
    if args.get("type", "int") != "int" or strategy not in ("group", "channel"):
        raise UnsupportedError(
            f"{module}: weights type={args.get('type')!r} strategy={strategy!r} (e.g. an fp8 scheme) is not read "
            "here; only int group/channel pack-quantized is supported"
        )
    if args.get("actorder") not in (None, "weight", "static"):
        raise UnsupportedError(
            f"{module}: actorder={args.get('actorder')!r} stores a weight_g_idx column permutation (GPTQ act-order): "
            "its groups are not contiguous blocks of columns, so it is not a block layout this tool reads or "
            "transcodes; re-export it without act-order (actorder: null or 'weight')")
    if args.get("dynamic"):
        raise UnsupportedError(f"{module}: dynamic weight quantization is not supported")
    return QuantSpec(
        int(args.get("num_bits", 8)), args.get("group_size") if strategy == "group" else None,
        bool(args.get("symmetric", True)),
    )


def _prefix_of(tensors: Mapping[str, Tensor]) -> str:
    prefixes = [k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")]
    if len(prefixes) != 1:
        raise FormatError(f"expected the tensors of one module, found weight_packed for {sorted(prefixes)}")
    return prefixes[0]


def _need(tensors: Mapping[str, Tensor], name: str, dtypes: tuple[torch.dtype, ...], shape: list[int]) -> Tensor:
    """``tensors[name]``, checked against the allowed ``dtypes`` (empty: any float) and ``shape``."""
    if name not in tensors:
        raise FormatError(f"{name} is missing; a {FORMAT} module needs it")
    t = tensors[name]
    ok_dtype = t.dtype in dtypes if dtypes else t.dtype.is_floating_point
    if not ok_dtype or list(t.shape) != shape:
        want = "/".join(str(d) for d in dtypes) or "float"
        raise FormatError(f"{name}: expected {want}{shape}, got {t.dtype}{list(t.shape)}")
    return t


def read_compressed(
    tensors_by_name: Mapping[str, Tensor], qconfig: Mapping[str, Any], prefix: str | None = None
) -> Tensor:
    """Dequantized ``[out, in]`` weight (scale dtype) of module ``prefix`` from its stored tensors.

    ``prefix`` may be omitted when ``tensors_by_name`` holds exactly one module's tensors.
    """
    prefix = prefix or _prefix_of(tensors_by_name)
    spec = spec_for_module(qconfig, prefix)
    if spec is None:
        raise FormatError(f"{prefix}: not quantized according to quantization_config")
    shape = _need(tensors_by_name, f"{prefix}.weight_shape", (torch.int64, torch.int32), [2])
    out_f, in_f = (int(v) for v in shape.tolist())
    spec.check_shape(f"{prefix}.weight", (out_f, in_f))
    n_groups = in_f // spec.group_len(in_f)
    packed = _need(tensors_by_name, f"{prefix}.weight_packed", (torch.int32,), [out_f, _words(in_f, spec.bits)])
    scale = _need(tensors_by_name, f"{prefix}.weight_scale", (), [out_f, n_groups])
    zero = None
    if not spec.symmetric:
        zp = _need(tensors_by_name, f"{prefix}.weight_zero_point", (torch.int32,), [_words(out_f, spec.bits), n_groups])
        zero = unpack_int32(zp, spec.bits, out_f, packed_dim=0)                     # [out, G]
    return dequantize(unpack_int32(packed, spec.bits, in_f), scale, zero)


def read_codes(tensors_by_name: Mapping[str, Tensor], qconfig: Mapping[str, Any], prefix: str) -> QuantCodes:
    """Module ``prefix``'s codes as ``QuantCodes`` (``u = q + 2^(b-1)``, asym ``zero = z + 2^(b-1)``), undecoded."""
    spec = spec_for_module(qconfig, prefix)
    if spec is None:
        raise FormatError(f"{prefix}: not quantized according to quantization_config")
    shape = _need(tensors_by_name, f"{prefix}.weight_shape", (torch.int64, torch.int32), [2])
    out_f, in_f = (int(v) for v in shape.tolist())
    n_groups = in_f // spec.group_len(in_f)
    packed = _need(tensors_by_name, f"{prefix}.weight_packed", (torch.int32,), [out_f, _words(in_f, spec.bits)])
    scale = _need(tensors_by_name, f"{prefix}.weight_scale", (), [out_f, n_groups])
    half = 1 << (spec.bits - 1)
    u = unpack_unsigned(packed, spec.bits, in_f)
    if u is None:
        u = (unpack_int32(packed, spec.bits, in_f).to(torch.int16) + half).to(torch.uint8)
    if spec.symmetric:
        return QuantCodes(u, scale, None, "sym", spec.bits)
    zp = _need(tensors_by_name, f"{prefix}.weight_zero_point", (torch.int32,), [_words(out_f, spec.bits), n_groups])
    zero = unpack_int32(zp, spec.bits, out_f, packed_dim=0).to(torch.int16) + half            # [out, G]
    return QuantCodes(u, scale, zero, "asym", spec.bits)


def packed_layout(
    prefix: str, shape: tuple[int, int], spec: QuantSpec, scale_dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of the tensors ``pack_quantized`` will produce, known before quantizing."""
    out_f, in_f = shape
    n_groups = in_f // spec.group_len(in_f)
    layout = {
        f"{prefix}.weight_packed": ((out_f, _words(in_f, spec.bits)), torch.int32),
        f"{prefix}.weight_scale": ((out_f, n_groups), scale_dtype),
        f"{prefix}.weight_shape": ((2,), torch.int64),
    }
    if not spec.symmetric:
        layout[f"{prefix}.weight_zero_point"] = ((_words(out_f, spec.bits), n_groups), torch.int32)
    return layout
