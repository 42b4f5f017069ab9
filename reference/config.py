"""Gemma 2 hyper-parameters: one frozen dataclass, named presets, and config.json round-trip.

Published values: ../shared/spec/GEMMA2_FORMATS.md §0 and §4.3 (gemma_pytorch ``gemma/config.py``,
the hub ``config.json`` files). ``query_pre_attn_scalar`` is 256 / 256 / 144 for 2B / 9B / 27B —
never the 224 that transformers' conversion script writes for 9B (spec §4.6).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma2_convert.core.errors import ConfigError

HEADS = {
    "Gemma2ForCausalLM": "causal_lm", "Gemma2Model": "base",
    "Gemma2ForSequenceClassification": "sequence_classification",
    "Gemma2ForTokenClassification": "token_classification",
}
CLASSIFICATION_HEADS = ("sequence_classification", "token_classification")
SLIDING = "sliding_attention"
FULL = "full_attention"

# Keys a config.json must state explicitly: their library defaults changed over time
# (transformers PR #34540), so guessing them silently produces a wrong model.
REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar",
)


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
    """Gemma 2's pattern: layer i is sliding iff i is even (spec §0, §4.7 item 7)."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


@dataclass(frozen=True)
class Gemma2Config:
    """Every hyper-parameter the Gemma 2 forward pass reads (spec §0, §4.3)."""

    vocab_size: int
    """Rows of the (tied) embedding: 256000 for every released size."""
    hidden_size: int
    """Residual stream width H."""
    intermediate_size: int
    """Width of each GeGLU branch I (gate_proj/up_proj rows)."""
    num_hidden_layers: int
    """Decoder layers L."""
    num_attention_heads: int
    """Query heads N."""
    num_key_value_heads: int
    """Key/value heads K; N must be a multiple of K (GQA, K == N is MHA)."""
    head_dim: int
    """Per-head width D; not H/N for any released size."""
    query_pre_attn_scalar: float
    """Scores are multiplied by query_pre_attn_scalar**-0.5 (256 / 256 / 144)."""
    sliding_window: int = 4096
    """Sliding layers let query i see key j iff 0 <= i - j <= sliding_window - 1."""
    attn_logit_softcapping: float | None = 50.0
    """scores = cap * tanh(scores / cap), before the mask; None disables."""
    final_logit_softcapping: float | None = 30.0
    """logits = cap * tanh(logits / cap); None disables."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_position_embeddings: int = 8192
    """Longest context the model was trained for."""
    layer_types: tuple[str, ...] = ()
    """Per-layer attention type, 'sliding_attention' or 'full_attention'; () means alternating from layer 0."""
    bos_token_id: int = 2
    """<bos> id."""
    eos_token_id: int | tuple[int, ...] = 1
    """<eos> id, or several (instruction-tuned models add <end_of_turn> = 107)."""
    pad_token_id: int = 0
    """<pad> id."""
    hidden_activation: str = "gelu_pytorch_tanh"
    """GeGLU activation; Gemma 2 uses tanh-approximated GELU."""
    tie_word_embeddings: bool = True
    """The output head is the embedding matrix (no lm_head tensor)."""
    architectures: tuple[str, ...] = ("Gemma2ForCausalLM",)
    """transformers class names; picks the head when loading."""
    torch_dtype: str = "bfloat16"
    """dtype of the stored weights, as written to config.json."""
    id2label: tuple[str, ...] = ()
    """Class names of a classification head, index = class id; empty for other heads."""
    problem_type: str | None = None
    """Sequence-classification loss: 'regression', 'single_label_classification' or 'multi_label_classification'."""
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    """Other config.json keys (JSON-encoded values), carried through unchanged."""

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", alternating_layer_types(self.num_hidden_layers))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values no Gemma 2 model can have."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}"
            )
        if not self.architectures or self.architectures[0] not in HEADS:
            raise ConfigError(f"architectures {list(self.architectures)} is not a Gemma 2 class; expected one of "
                              f"{sorted(HEADS)}")
        if self.head in CLASSIFICATION_HEADS and not self.id2label:
            object.__setattr__(self, "id2label", ("LABEL_0", "LABEL_1"))  # transformers' default of two labels
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise ConfigError(f"unknown layer_types {sorted(bad)}; expected {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "sliding_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    # ---- derived -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """N·D: rows of q_proj, columns of o_proj."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """K·D: rows of k_proj and v_proj."""
        return self.num_key_value_heads * self.head_dim

    @property
    def head(self) -> str:
        """What sits on the decoder: 'causal_lm', 'base', 'sequence_classification' or 'token_classification'."""
        return HEADS[self.architectures[0]]

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return (e,) if isinstance(e, int) else tuple(e)

    def replace(self, **changes: Any) -> Gemma2Config:
        return dataclasses.replace(self, **changes)

    # ---- presets -------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> Gemma2Config:
        """A named preset: '2b', '9b', '27b' (published values) or 'tiny' (for tests and the demo)."""
        try:
            return PRESETS[name.lower()]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    # ---- config.json -----------------------------------------------------------------------
    @staticmethod
    def from_hf_dict(d: Mapping[str, Any], source: str | Path | None = None) -> Gemma2Config:
        """Build from a transformers config.json dict; missing required keys are an error naming them."""
        return _from_hf_dict(d, source)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers 4.4x and 5.x both load, with every Gemma 2 field explicit."""
        return _to_hf_dict(self)

    @staticmethod
    def from_json_file(path: str | Path) -> Gemma2Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config: {e}", path) from None
        if not isinstance(d, dict):
            raise ConfigError("config.json is not a JSON object", path)
        return _from_hf_dict(d, path)


_FIELD_NAMES = {f.name for f in dataclasses.fields(Gemma2Config)}
_KNOWN_KEYS = (_FIELD_NAMES - {"extra"}) | {"rope_parameters", "model_type", "dtype", "hidden_act", "label2id",
                                           "num_labels"}


def _from_hf_dict(d: Mapping[str, Any], source: str | Path | None) -> Gemma2Config:
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise ConfigError(
            f"config is missing required key(s) {', '.join(missing)}; Gemma 2 defaults for these changed "
            "between library versions, so they must be stated (see the published config.json)", source
        )
    if d.get("model_type", "gemma2") != "gemma2":
        raise ConfigError(f"model_type is {d['model_type']!r}, expected 'gemma2'", source)
    kw: dict[str, Any] = {k: d[k] for k in _KNOWN_KEYS & set(d) if k in _FIELD_NAMES}
    rope = d.get("rope_parameters")
    if isinstance(rope, Mapping) and "rope_theta" in rope:
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported (Gemma 2 uses 'default')", source)
        kw["rope_theta"] = rope["rope_theta"]
    if "dtype" in d and "torch_dtype" not in d:
        kw["torch_dtype"] = d["dtype"]
    for k in ("layer_types", "architectures"):
        if kw.get(k) is not None:
            kw[k] = tuple(kw[k])
        else:
            kw.pop(k, None)
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"])
    if kw.get("torch_dtype") is None:
        kw.pop("torch_dtype", None)
    kw["id2label"] = _labels(d, source)
    kw["extra"] = tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in _KNOWN_KEYS))
    try:
        return Gemma2Config(**kw)
    except TypeError as e:
        raise ConfigError(f"bad config value: {e}", source) from None



def _labels(d: Mapping[str, Any], source: str | Path | None) -> tuple[str, ...]:
    """Class names from id2label ({"0": name, ...}) or num_labels; () when neither is given."""
    id2label = d.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        try:
            ids = sorted(int(k) for k in id2label)
        except ValueError:
            raise ConfigError(f"id2label keys must be integers, got {sorted(id2label)}", source) from None
        if ids != list(range(len(ids))):
            raise ConfigError(f"id2label ids must be 0..{len(ids) - 1}, got {ids}", source)
        return tuple(str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids)
    n = d.get("num_labels")
    return tuple(f"LABEL_{i}" for i in range(n)) if isinstance(n, int) and n > 0 else ()


def _to_hf_dict(c: Gemma2Config) -> dict[str, Any]:
    d: dict[str, Any] = {json_key: json.loads(v) for json_key, v in c.extra}
    eos = c.eos_token_id if isinstance(c.eos_token_id, int) else list(c.eos_token_id)
    d.update({
        "architectures": list(c.architectures),
        "model_type": "gemma2",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "query_pre_attn_scalar": _num(c.query_pre_attn_scalar),
        "sliding_window": c.sliding_window,
        "layer_types": list(c.layer_types),
        "attn_logit_softcapping": c.attn_logit_softcapping,
        "final_logit_softcapping": c.final_logit_softcapping,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_activation": c.hidden_activation,
        "hidden_act": c.hidden_activation,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": d.get("initializer_range", 0.02),
        "use_cache": True,
        "cache_implementation": "hybrid",
        "torch_dtype": c.torch_dtype,
    })
    d.pop("rope_parameters", None)
    if c.id2label:
        d["id2label"] = {str(i): name for i, name in enumerate(c.id2label)}
        d["label2id"] = {name: i for i, name in enumerate(c.id2label)}
    if c.problem_type is not None:
        d["problem_type"] = c.problem_type
    return d


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


_COMMON = dict(vocab_size=256000, sliding_window=4096, max_position_embeddings=8192)

PRESETS: dict[str, Gemma2Config] = {
    "2b": Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, **_COMMON),
    "9b": Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, **_COMMON),
    "27b": Gemma2Config(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144, **_COMMON),
    # Small enough for tests; exercises GQA, head_dim != H/N, query_pre_attn_scalar != head_dim and a
    # window much shorter than the context.
    "tiny": Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                         sliding_window=16, max_position_embeddings=512, torch_dtype="float32"),
}
