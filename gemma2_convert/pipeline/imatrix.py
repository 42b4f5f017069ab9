"""Compute an importance matrix as ``llama-imatrix`` does, with the reference model streaming layer by layer.

The conventions of llama.cpp's ``tools/imatrix/imatrix.cpp`` (``compute_imatrix``, ``collect_imatrix``):

* **Tokens**: the whole text tokenized once with ``<bos>`` in front (``common_tokenize(..., add_special=true,
  parse_special=false)``: SentencePiece ids, except that the pieces llama.cpp types CONTROL are spelled out,
  ``llama_tokenizer``); chunk ``k`` is
  tokens ``[k·n, (k+1)·n)`` with its *first token replaced* by ``<bos>`` (not shifted); ``n_chunk =
  min(--chunks, len(tokens) // n)``. Each chunk is an independent sequence (the KV cache is cleared).
  (llama-imatrix refuses a text of fewer than two chunks; one is enough here.)
* **Weights**: every ``MUL_MAT`` whose weight name starts with ``blk.`` — in Gemma 2 the seven decoder
  projections ``attn_q/k/v/output``, ``ffn_gate/up/down`` of each layer. The output head is collected only
  with ``--process-output`` and only under the name ``output.weight``; Gemma 2 ties it to ``token_embd``, so
  it is never collected (checked: 28 entries for 4 layers with ``--process-output`` too), and the head is not
  computed here at all.
* **Statistics**: ``in_sum2[j] = Σ_tokens x_j²`` of the matmul's input, ``counts = [tokens seen]`` (one count
  for a dense weight); ``chunk_count = counts / chunk_size``. llama.cpp adds float32 squares one token at a
  time; here each chunk's squares are summed in float32 (pairwise) and the chunks in float64: more accurate,
  and within a cosine of 1 - 1e-8 of llama.cpp's on the test model.

Memory: the hidden states of a group of chunks (``HIDDEN_BUDGET``) stay resident; the decoder weights are
read one layer at a time for the whole group, so a 27B needs one layer in float32 (~2.3 GB) plus the group
(measured: peak RssAnon 3.0 GB for 2 chunks of 64 tokens on a 27B-shaped gemma_pytorch checkpoint).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as spm_pb

from gemma2_convert.core.errors import ConversionError, NonFiniteError, name_list
from gemma2_convert.core.progress import SILENT, Progress
from gemma2_convert.formats.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix
from gemma2_convert.formats.gguf.names import gguf_name
from gemma2_convert.formats.output import check_output
from gemma2_convert.formats.registry import Checkpoint, open_checkpoint
from gemma2_convert.formats.tokenizer.gguf_vocab import TokenType, build_gguf_vocab
from gemma2_convert.formats.tokenizer.spm import read_spm
from gemma2_convert.pipeline.calibrate import read_text
from reference.layers import rope_cos_sin
from reference.model import Gemma2Model
from reference.weights import WeightStore

HIDDEN_BUDGET = 1 << 30
"""Bytes of float32 hidden states held at once; more chunks than fit are run in groups (weights re-read)."""
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
"""The matmuls llama-imatrix collects in each layer (HF names; ``blk.{i}.*`` in GGUF)."""


@dataclass
class Sums:
    """Running statistics of one weight: Σx² per input column (float64) and the tokens seen."""

    in_sum2: torch.Tensor
    count: int = 0


@dataclass
class ImatrixResult:
    path: Path
    format: str
    """gguf or dat."""
    entries: int
    chunks: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def llama_tokenizer(ckpt: Checkpoint) -> spm.SentencePieceProcessor:
    """The model's SentencePiece tokenizer as llama.cpp tokenizes text without ``--parse-special``: the pieces
    llama.cpp's converter types CONTROL (``<start_of_turn>``, ``<end_of_turn>``, ``<mask>``…: USER_DEFINED in
    Gemma's tokenizer.model, so SentencePiece matches them) are not matched in the text but spelled out."""
    if ckpt.tokenizer is not None:
        blob = ckpt.tokenizer.read_bytes()
    elif ckpt.tokenizer_blob is not None:
        blob = ckpt.tokenizer_blob
    else:
        raise ConversionError("an imatrix needs the model's tokenizer.model (none found next to the "
                              "checkpoint or inside it); put it beside the checkpoint", ckpt.path)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(blob)
        model = read_spm(Path(tmp) / "tokenizer.model")
    types = build_gguf_vocab(model, ckpt.config.vocab_size, None).token_types
    proto = spm_pb.ModelProto()
    proto.ParseFromString(blob)
    for i, piece in enumerate(proto.pieces):
        if types[i] == TokenType.CONTROL and piece.type == spm_pb.ModelProto.SentencePiece.USER_DEFINED:
            piece.type = spm_pb.ModelProto.SentencePiece.CONTROL
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def chunk_ids(sp: spm.SentencePieceProcessor, text: str, bos: int, chunk_size: int,
              chunks: int | None = None) -> torch.Tensor:
    """llama-imatrix's chunks ``[n_chunk, chunk_size]``: ``<bos>`` + the tokenized text, cut into
    ``chunk_size`` pieces whose first token is replaced by ``<bos>``; a shorter rest is dropped."""
    if chunk_size < 1:
        raise ConversionError(f"--chunk-size must be at least 1, got {chunk_size}")
    tokens = [bos, *sp.encode(text)]
    n = len(tokens) // chunk_size if chunks is None else min(chunks, len(tokens) // chunk_size)
    if n < 1:
        raise ConversionError(f"the calibration text has {len(tokens)} tokens with <bos>, fewer than one "
                              f"chunk of {chunk_size}; give more text or a smaller --chunk-size")
    ids = torch.tensor(tokens[: n * chunk_size], dtype=torch.long).view(n, chunk_size)
    ids[:, 0] = bos
    return ids


def imatrix_stats(ckpt: Checkpoint, ids: torch.Tensor, progress: Progress = SILENT) -> dict[str, Sums]:
    """Σx² and token counts of the input of every decoder projection (HF names), over the chunks ``ids``
    ``[n_chunk, T]``, each chunk one sequence; layer-streamed in groups of ``HIDDEN_BUDGET``."""
    cfg = ckpt.config
    if int(ids.max()) >= cfg.vocab_size:
        raise ConversionError(f"the tokenizer gives id {int(ids.max())}, outside the model's vocabulary of "
                              f"{cfg.vocab_size}: is it this model's tokenizer.model?", ckpt.path)
    model = Gemma2Model(cfg, WeightStore(ckpt.tensors, cfg, torch.float32, resident=False))
    sums: dict[str, Sums] = {}
    group = max(1, HIDDEN_BUDGET // (ids.shape[1] * cfg.hidden_size * 4))
    with progress.phase("imatrix", int(ids.numel()), "tokens"):
        for start in range(0, ids.shape[0], group):
            _run_group(model, ids[start:start + group], sums, progress)
    return sums


@torch.inference_mode()
def _run_group(model: Gemma2Model, ids: torch.Tensor, sums: dict[str, Sums], progress: Progress) -> None:
    """All layers over the chunks ``ids`` [G, T], one layer's weights resident at a time."""
    cfg, store = model.config, model.weights
    G, T = ids.shape
    q_idx = torch.arange(T)  # [T]
    cos, sin = rope_cos_sin(q_idx[None], cfg, torch.float32)  # [1, T, D]
    normalizer = torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32)  # §4.7.1
    h = store.embed(ids) * normalizer  # [G, T, H]

    def observe(name: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        s = sums.setdefault(name, Sums(torch.zeros(x2.shape[1], dtype=torch.float64)))
        s.in_sum2 += x2.square().sum(0)  # float32 (pairwise) per chunk, accumulated in float64
        s.count += x2.shape[0]

    model.observer = observe
    try:
        for i in range(cfg.num_hidden_layers):
            names = [n for n in store.tensors if n.startswith(f"model.layers.{i}.")]
            for n in names:
                store.replace(n, store.tensors[n].load().to(torch.float32).contiguous())
            share = (T * (i + 1)) // cfg.num_hidden_layers - (T * i) // cfg.num_hidden_layers
            for s in range(G):  # one sequence at a time: attention scores [1, N, T, T]
                h[s:s + 1] = model._layer(i, h[s:s + 1], cos, sin, q_idx, None, None, None)
                progress.advance(share, f"layer {i}")
            for n in names:
                store.replace(n, None)
    finally:
        model.observer = None


def to_imatrix(sums: dict[str, Sums], chunk_size: int, datasets: list[str],
               source: Path | None = None) -> Imatrix:
    """The statistics in llama.cpp's file form: GGUF names, float32 sums, counts ``[tokens]``. Non-finite
    sums are an error naming ``source``, as in llama-imatrix ("non-finite values detected")."""
    bad = sorted(gguf_name(n) for n, s in sums.items() if not bool(torch.isfinite(s.in_sum2.float()).all()))
    if bad:
        raise NonFiniteError(f"the inputs of {name_list(bad, 4)} hold NaN/Inf (or overflow float32 when "
                             "squared): the model's weights are not finite or it diverges on this text; "
                             "check it with `gemma2-convert inspect --scan`", source)
    entries = {gguf_name(n): ImatrixEntry(s.in_sum2.to(torch.float32), torch.tensor([float(s.count)]))
               for n, s in sums.items()}
    tokens = max((s.count for s in sums.values()), default=0)
    return Imatrix(dict(sorted(entries.items())), datasets, tokens // chunk_size, chunk_size)


def compute_imatrix(src: str | Path | Checkpoint, calibration: Path, *, chunk_size: int = 512,
                    chunks: int | None = None, progress: Progress = SILENT) -> Imatrix:
    """The importance matrix of ``src`` (any readable format) over the text file ``calibration``, as
    ``llama-imatrix -f calibration -c chunk_size [--chunks N]`` computes it on the same model."""
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    text = read_text(calibration, "")
    ids = chunk_ids(llama_tokenizer(ckpt), text, ckpt.config.bos_token_id, chunk_size, chunks)
    return to_imatrix(imatrix_stats(ckpt, ids, progress), chunk_size, [str(calibration)], ckpt.path)


def make_imatrix(src: str | Path, calibration: Path, out: str | Path, *, chunk_size: int = 512,
                 chunks: int | None = None, legacy: bool = False, force: bool = False,
                 progress: Progress = SILENT) -> ImatrixResult:
    """``gemma2-convert imatrix``: compute (``compute_imatrix``) and write it atomically, GGUF or ``.dat``."""
    out = Path(out)
    check_output(out, force, [src, calibration])  # before hours of work, not after
    t0 = time.perf_counter()
    im = compute_imatrix(src, calibration, chunk_size=chunk_size, chunks=chunks, progress=progress)
    seconds = time.perf_counter() - t0
    write_imatrix(out, im, legacy=legacy, force=force)
    return ImatrixResult(out, "dat" if legacy else "gguf", len(im.entries), im.chunk_count,
                         im.chunk_count * chunk_size, seconds)
