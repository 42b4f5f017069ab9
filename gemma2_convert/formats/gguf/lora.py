"""A PEFT LoRA adapter as llama.cpp's LoRA GGUF (the layout ``convert_lora_to_gguf.py`` writes),
Gemma-correct.

Layout (llama.cpp ``src/llama-adapter.cpp``): ``general.architecture`` gemma2, ``general.type`` adapter,
``adapter.type`` lora, ``adapter.lora.alpha`` (float32); per adapted weight ``<gguf name>.lora_a`` = PEFT's
``A [r, in]`` and ``<gguf name>.lora_b`` = ``B [out, r]``, untransposed (ggml ``ne`` is the shape reversed, so
``a.ne[0]`` = the weight's ``in``, ``b.ne[1]`` its ``out``). llama.cpp adds ``scale · B(A x)`` with
``scale = adapter_scale · alpha / r``, ``r = b.ne[0]``.

Two factors go into B so that llama.cpp computes PEFT's update exactly:

* the module's own scale over ``alpha / r``: 1 for plain LoRA, ``√r`` for rsLoRA (``alpha / √r``), and the
  ratio of an ``alpha_pattern`` entry to the global alpha;
* on ``attn_q``, the query-scale fold of the base GGUF (``names.query_fold_ratio``): the base stores
  ``ratio · W_q``, so the update must be ``ratio · ΔW_q`` too — applied exactly when the base carries the
  fold.

What a LoRA GGUF cannot express — DoRA's renormalisation, ``modules_to_save`` replacements, embedding and
output head adapters (Gemma 2's head is the tied ``token_embd``) — is refused with one error that suggests
merging.
"""

from __future__ import annotations

from gemma2_convert import __version__
from gemma2_convert.core.errors import UnsupportedError, name_list
from gemma2_convert.formats.adapter import Adapter
from gemma2_convert.formats.gguf import metadata as gm
from gemma2_convert.formats.gguf.names import ARCH, gguf_name, is_query
from gemma2_convert.formats.gguf.values import Value, ValueType, f32, string, u32
from gemma2_convert.formats.gguf.writer import TensorPlan
from reference.lora import LowRank

K_ALPHA = "adapter.lora.alpha"


def refusals(adapter: Adapter) -> list[str]:
    """What in ``adapter`` llama.cpp's LoRA GGUF cannot hold, one line per name."""
    out = [f"{n} (DoRA magnitude)" for n, u in adapter.updates.items() if u.magnitude is not None]
    out += [f"{n} (embedding adapter)" for n, u in adapter.updates.items() if u.embedding]
    out += [f"{n} (output head: llama.cpp's gemma2 has none apart from token_embd)" for n in adapter.updates
            if n == "lm_head.weight"]
    out += [f"{n} (modules_to_save replacement)" for n in adapter.replacements]
    out += [f"{n} (saved base layer: a resized vocabulary)" for n in adapter.base_layers]
    return out


def check_expressible(adapter: Adapter) -> None:
    bad = refusals(adapter)
    if bad:
        raise UnsupportedError(f"a llama.cpp LoRA GGUF cannot express {len(bad)} part(s) of this adapter: "
                               f"{name_list(bad)}. Merge it instead: gemma2-convert convert BASE OUT.gguf "
                               f"--to gguf --adapter {adapter.path}", adapter.path)


def _scaled(factor: float):
    return None if factor == 1.0 else (lambda w: (w.double() * factor).float())


def lora_plans(adapter: Adapter, fold: float) -> list[TensorPlan]:
    """``lora_a`` / ``lora_b`` per adapted weight in the order of the base's layers, F32; B carries the
    factors."""
    plans = []
    for hf, u in sorted(adapter.updates.items(), key=lambda kv: _order(kv[0])):
        name = gguf_name(hf)
        factor = b_factor(u, adapter.alpha) * (fold if is_query(hf) else 1.0)
        plans.append(TensorPlan(name + ".lora_a", u.a, "F32"))
        plans.append(TensorPlan(name + ".lora_b", u.b, "F32", _scaled(factor)))
    return plans


def b_factor(u: LowRank, alpha: float) -> float:
    """What B is multiplied by so that llama.cpp's ``alpha / r`` gives PEFT's scale ``u.scale``."""
    llama = alpha / u.rank
    return 1.0 if u.scale == llama else u.scale / llama


def _order(hf: str) -> tuple[int, str]:
    parts = hf.split(".")
    return (int(parts[2]), hf) if hf.startswith("model.layers.") else (-1, hf)


def lora_metadata(adapter: Adapter, base_name: str, fold: float) -> list[tuple[str, Value]]:
    """llama.cpp's adapter keys, and ours: the base it was made for and the query fold applied to attn_q's
    B."""
    return [
        ("general.architecture", string(ARCH)),
        ("general.type", string("adapter")),
        ("general.name", string(adapter.path.name)),
        ("general.alignment", u32(32)),
        ("adapter.type", string("lora")),
        (K_ALPHA, f32(adapter.alpha)),
        (gm.K_VERSION, string(__version__)),
        (gm.K_SOURCE, string(base_name)),
        (gm.K_QUERY_FOLD, Value(ValueType.FLOAT64, fold)),
    ]
