"""Importance matrices: llama.cpp's file formats (GGUF and legacy .dat) and ``gemma2-convert imatrix``.

The layouts are pinned byte for byte twice: against bytes built here field by field from imatrix.cpp's
``save_imatrix`` / ``save_imatrix_legacy``, and against ``llama-imatrix`` itself re-saving our files. The
statistics equal a plain full-model forward with an observer exactly, and llama-imatrix's on the trained test
model to a cosine ≥ 0.999 per tensor (measured: ≥ 0.99999999), with the same tensors, counts and chunk count.
"""

from __future__ import annotations

import struct
from pathlib import Path

import llama_cpp
import pytest
import torch
from click.testing import CliRunner

from gemma2_convert.cli.main import cli
from gemma2_convert.core.errors import ConversionError, FormatError, NonFiniteError
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.gguf.imatrix import (
    Imatrix,
    ImatrixEntry,
    read_imatrix,
    write_imatrix,
)
from gemma2_convert.formats.gguf.names import gguf_name
from gemma2_convert.formats.registry import open_checkpoint
from gemma2_convert.pipeline import imatrix as pipeline
from gemma2_convert.pipeline.gguf import to_gguf
from reference.model import Gemma2Model
from reference.weights import WeightStore
from tests.llama_tools import run_tool

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # no OpenMP stalls on a busy shared machine

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt"
TRICKY = "  Hi  <start_of_turn>user\nWorld\t\t x \U0001F600 <eos> <bos><end_of_turn><mask> <b>x</b>\n\n\n"


def small() -> Imatrix:
    """Two dense entries (out of name order) and one with two experts, one of them never routed to."""
    return Imatrix({
        "blk.1.ffn_down.weight": ImatrixEntry(torch.tensor([3.0, 0.5, 7.25, 1.0]), torch.tensor([4.0])),
        "blk.0.attn_q.weight": ImatrixEntry(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
                                            torch.tensor([3.0])),
        "blk.0.ffn_gate_exps.weight": ImatrixEntry(torch.tensor([[2.0, 4.0], [0.0, 0.0]]),
                                                   torch.tensor([2.0, 0.0])),
    }, ["calib.txt"], 1, 4)


def s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def expected_gguf(im: Imatrix) -> bytes:
    """save_imatrix's file, field by field: KVs in insertion order, tensors sorted, in_sum2 before counts,
    each with ggml_n_dims dims (a dense [cols, 1] is 1-D), data aligned to 32."""
    kv = [s("general.type") + struct.pack("<I", 8) + s("imatrix"),
          s("imatrix.datasets") + struct.pack("<IIQ", 9, 8, 1) + s("calib.txt"),
          s("imatrix.chunk_count") + struct.pack("<II", 4, im.chunk_count),
          s("imatrix.chunk_size") + struct.pack("<II", 4, im.chunk_size)]
    infos, data = [], b""
    for name in sorted(im.entries):
        e = im.entries[name]
        cols = e.in_sum2.shape[-1]
        for suffix, dims, t in ((".in_sum2", [cols] + ([e.n_mat] if e.n_mat > 1 else []), e.in_sum2),
                                (".counts", [1] + ([e.n_mat] if e.n_mat > 1 else []), e.counts)):
            infos.append(s(name + suffix) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, len(data)))
            raw = t.numpy().tobytes()
            data += raw + b"\0" * (-len(raw) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


def expected_dat(im: Imatrix) -> bytes:
    """save_imatrix_legacy's file: entries with data, sorted; values (sum / count) · ncall with ncall =
    ceil(max count / chunk size), 1 · ncall for a zero count; then the chunk count and the last dataset."""
    out = b""
    names = sorted(n for n, e in im.entries.items() if (e.counts > 0).any())
    for name in names:
        e = im.entries[name]
        ncall = (int(e.counts.max()) + im.chunk_size - 1) // im.chunk_size
        vals = [(v / c if c else 1.0) * ncall for row, c in zip(e.in_sum2.reshape(e.n_mat, -1).tolist(),
                                                                 e.counts.tolist()) for v in row]
        out += struct.pack("<i", len(name)) + name.encode()
        out += struct.pack(f"<ii{len(vals)}f", ncall, len(vals), *vals)
    return struct.pack("<i", len(names)) + out + struct.pack("<ii", im.chunk_count, 9) + b"calib.txt"


def test_gguf_and_dat_layouts_byte_for_byte(tmp_path):
    im = small()
    write_imatrix(tmp_path / "a.gguf", im)
    write_imatrix(tmp_path / "a.dat", im, legacy=True)
    assert (tmp_path / "a.gguf").read_bytes() == expected_gguf(im)
    assert (tmp_path / "a.dat").read_bytes() == expected_dat(im)


def test_round_trips_and_importance(tmp_path):
    im = small()
    write_imatrix(tmp_path / "a.gguf", im)
    write_imatrix(tmp_path / "a.dat", im, legacy=True)
    g, d = read_imatrix(tmp_path / "a.gguf"), read_imatrix(tmp_path / "a.dat")
    assert (g.datasets, g.chunk_count, g.chunk_size) == (["calib.txt"], 1, 4)
    assert (d.datasets, d.chunk_count, d.chunk_size) == (["calib.txt"], 1, 0)
    for name, e in im.entries.items():
        assert torch.equal(g.entries[name].in_sum2, e.in_sum2)
        assert torch.equal(g.entries[name].counts, e.counts)
        assert torch.equal(g.importance(name), im.importance(name))
        # a .dat keeps one call count per weight: experts come back flat, with the same weights
        torch.testing.assert_close(d.importance(name), im.importance(name).flatten(), rtol=1e-6, atol=0)
    # llama-quantize: sums / count per expert, 1 where the count is 0; a .dat: values / ncall
    assert torch.equal(im.importance("blk.0.attn_q.weight"), torch.arange(1, 9, dtype=torch.float32) / 3)
    assert im.importance("blk.0.ffn_gate_exps.weight").tolist() == [[1.0, 2.0], [1.0, 1.0]]
    assert d.entries["blk.1.ffn_down.weight"].counts.tolist() == [1.0]  # ncall = ceil(4 / 4)
    assert g.importance("blk.9.attn_q.weight") is None
    write_imatrix(tmp_path / "b.dat", d, legacy=True)  # a .dat read back writes the same bytes
    assert (tmp_path / "b.dat").read_bytes() == (tmp_path / "a.dat").read_bytes()
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        write_imatrix(tmp_path / "a.gguf", im)
    write_imatrix(tmp_path / "a.gguf", d, force=True)
    assert read_imatrix(tmp_path / "a.gguf").chunk_size == 0


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = tmp / "good.dat"
    write_imatrix(good, small(), legacy=True)
    raw = good.read_bytes()
    files = {"truncated .dat": (raw[:-20], "truncated or not an imatrix .dat: .* values needs"),
             "trailing bytes": (raw + b"junk", "4 unexpected bytes after the dataset name"),
             "not an imatrix": (b"\x00\x01\x02\x03" * 8, "neither GGUF nor a legacy .dat"),
             "empty": (b"", "needs 4 bytes at offset 0")}
    bad = small()
    bad.entries["blk.1.ffn_down.weight"].in_sum2[1] = float("nan")
    (tmp / "nan.gguf").write_bytes(expected_gguf(bad))
    out = {k: (tmp / f"{i}.dat", msg) for i, (k, (data, msg)) in enumerate(files.items())}
    for path, (data, _) in zip((p for p, _ in out.values()), files.values()):
        path.write_bytes(data)
    out["NaN in a GGUF"] = (tmp / "nan.gguf", "'blk.1.ffn_down.weight': in_sum2 holds negative, NaN or Inf")
    half = expected_gguf(small()).replace(b"blk.0.attn_q.weight.counts", b"blk.0.attn_q.weight.countz")
    (tmp / "unpaired.gguf").write_bytes(half)
    out["unpaired"] = (tmp / "unpaired.gguf", "mismatched sums and counts: blk.0.attn_q.weight")
    nometa = expected_gguf(small()).replace(b"imatrix.chunk_size", b"imatrix.chunk_sizf")
    (tmp / "nometa.gguf").write_bytes(nometa)
    out["no metadata"] = (tmp / "nometa.gguf", "missing metadata imatrix.chunk_size")
    return out


def test_bad_files_are_refused_with_what_is_wrong(tmp_path):
    for what, (path, msg) in bad_files(tmp_path).items():
        with pytest.raises(FormatError, match=msg.replace("(", r"\(")) as err:
            read_imatrix(path)
        assert str(path) in str(err.value), what
    with pytest.raises(FormatError, match="no such file"):
        read_imatrix(tmp_path / "missing.gguf")


def test_tokens_are_llama_cpp_s(tmp_path):
    """Our chunks' ids = llama.cpp's tokenizer without --parse-special on the F32 GGUF: the real text, and
    text with the turn markers and <mask> (USER_DEFINED in tokenizer.model, CONTROL in llama.cpp: spelled
    out)."""
    gguf = to_gguf(MODEL, tmp_path / "f32.gguf", type_name="f32", verify=False).output
    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    for ckpt in (open_checkpoint(MODEL), open_checkpoint(gguf)):
        sp = pipeline.llama_tokenizer(ckpt)
        for text in (TRICKY, CAL.read_text()):
            assert vocab.tokenize(text.encode(), add_bos=True, special=False) == [2, *sp.encode(text)]
    ids = pipeline.chunk_ids(sp, "a b c d e f g h", 2, 4)  # <bos> + 8 tokens: 2 chunks of 4, the rest dropped
    want = [2, *sp.encode("a b c d e f g h")]
    assert ids.tolist() == [[2, *want[1:4]], [2, *want[5:8]]]
    with pytest.raises(ConversionError, match="fewer than one chunk of 64"):
        pipeline.chunk_ids(sp, "a b", 2, 64)


class Recorder(Progress):
    def __init__(self) -> None:
        self.phases: list[tuple[str, int | None, str]] = []
        self.done = 0

    def begin(self, label: str, total: int | None = None, unit: str = "bytes") -> None:
        self.phases.append((label, total, unit))

    def advance(self, amount: int = 1, item: str = "") -> None:
        self.done += amount


def naive_sums(ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Σx² over every token of every decoder matmul input: the whole model resident, one forward per chunk."""
    ckpt = open_checkpoint(MODEL)
    model = Gemma2Model(ckpt.config, WeightStore(ckpt.tensors, ckpt.config, torch.float32))
    acc: dict[str, tuple[torch.Tensor, int]] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        s, n = acc.get(name, (torch.zeros(x.shape[-1], dtype=torch.float64), 0))
        x2 = x.reshape(-1, x.shape[-1])
        acc[name] = (s + x2.square().sum(0), n + x2.shape[0])

    model.observer = observe
    for chunk in ids:
        model.decode(chunk[None])
    return acc


def test_statistics_equal_a_full_model_forward(monkeypatch):
    ckpt = open_checkpoint(MODEL)
    ids = pipeline.chunk_ids(pipeline.llama_tokenizer(ckpt), CAL.read_text(), 2, 64, chunks=3)
    want = naive_sums(ids)
    for budget in (pipeline.HIDDEN_BUDGET, 1):  # 1: every chunk a group of its own (the weights re-read)
        monkeypatch.setattr(pipeline, "HIDDEN_BUDGET", budget)
        progress = Recorder()
        got = pipeline.imatrix_stats(ckpt, ids, progress)
        assert progress.phases == [("imatrix", 192, "tokens")] and progress.done == 192  # the bar's tokens/s
        assert sorted(got) == sorted(want) and len(got) == 7 * ckpt.config.num_hidden_layers
        assert {n.split(".", 3)[3].rsplit(".", 1)[0] for n in got} == set(pipeline.PROJECTIONS)
        for name, (s, n) in want.items():
            assert got[name].count == n == 3 * 64
            assert torch.equal(got[name].in_sum2, s), (budget, name, (got[name].in_sum2 - s).abs().max())
    im = pipeline.to_imatrix(got, 64, ["cal.txt"])
    assert (im.chunk_count, im.chunk_size, len(im.entries)) == (3, 64, 28)
    e = im.entries[gguf_name("model.layers.2.mlp.down_proj.weight")]
    assert e.counts.tolist() == [192.0] and e.in_sum2.dtype == torch.float32 and e.in_sum2.shape == (512,)


def test_non_finite_statistics_are_an_error():
    big = torch.tensor([1.0, 1e300], dtype=torch.float64)  # overflows float32
    sums = {"model.layers.0.mlp.down_proj.weight": pipeline.Sums(big, 4),
            "model.layers.0.mlp.up_proj.weight": pipeline.Sums(big[:1], 4)}
    with pytest.raises(NonFiniteError, match=r"^m: the inputs of blk\.0\.ffn_down\.weight hold NaN/Inf"):
        pipeline.to_imatrix(sums, 4, [], Path("m"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.mark.slow  # llama-imatrix four times and ours twice (~15 s on 2 CPUs)
def test_matches_llama_imatrix(tmp_path):
    gguf = to_gguf(MODEL, tmp_path / "f32.gguf", type_name="f32", verify=False).output
    run_tool("llama-imatrix", "-m", gguf, "-f", CAL, "-c", "128", "--chunks", "8", "-t", "2", "--no-ppl",
             "-o", tmp_path / "llama.gguf")
    theirs = read_imatrix(tmp_path / "llama.gguf")
    for src in (MODEL, gguf):  # the HF directory and the GGUF: every readable input gives the same
        ours = pipeline.compute_imatrix(src, CAL, chunk_size=128, chunks=8)
        assert sorted(ours.entries) == sorted(theirs.entries) and len(ours.entries) == 28
        assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (8, 128)
        worst = min((cosine(ours.entries[n].in_sum2, e.in_sum2), n) for n, e in theirs.entries.items())
        assert worst[0] >= 0.999, worst
        assert all(torch.equal(ours.entries[n].counts, e.counts) for n, e in theirs.entries.items())
    # llama-imatrix re-saving our files (it only loads them: no model run) writes the same bytes
    ours.datasets = theirs.datasets
    write_imatrix(tmp_path / "ours.gguf", ours)
    write_imatrix(tmp_path / "ours.dat", ours, legacy=True)
    for fmt, mine in (("gguf", "ours.gguf"), ("dat", "ours.dat")):
        run_tool("llama-imatrix", "-m", gguf, "--in-file", tmp_path / "ours.gguf", "-c", "128",
                 "--output-format", fmt, "-o", tmp_path / f"resaved.{fmt}")
        assert (tmp_path / f"resaved.{fmt}").read_bytes() == (tmp_path / mine).read_bytes(), fmt
    # and llama-imatrix's own .dat, read and written back, keeps its bytes
    run_tool("llama-imatrix", "-m", gguf, "--in-file", tmp_path / "llama.gguf", "-c", "128",
             "--output-format", "dat", "-o", tmp_path / "llama.dat")
    write_imatrix(tmp_path / "again.dat", read_imatrix(tmp_path / "llama.dat"), legacy=True)
    assert (tmp_path / "again.dat").read_bytes() == (tmp_path / "llama.dat").read_bytes()


def test_command(tmp_path):
    out = tmp_path / "im.dat"
    args = ["imatrix", str(MODEL), "--calibration", str(CAL), "-o", str(out), "--chunk-size", "32",
            "--chunks", "2", "--format", "dat", "--quiet"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    im = read_imatrix(out)
    assert len(im.entries) == 28 and im.chunk_count == 2 and im.datasets == [str(CAL)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    r = CliRunner().invoke(cli, [*args, "--force", "--json"])
    assert r.exit_code == 0 and '"tokens": 64' in r.output
    r = CliRunner().invoke(cli, ["imatrix", "--help"])
    assert r.exit_code == 0 and "Examples" in r.output and "--chunk-size" in r.output
