"""``--imatrix`` on to-gguf and gemma2-quantize against llama.cpp's own ``llama-quantize --imatrix``.

The acceptance: the same importance matrix given to ``llama-quantize`` (on the F32 GGUF of the model) and to our
``to-gguf`` (on the model) gives the same tensors, byte for byte, for Q4_0, Q4_K_M, IQ4_XS, Q3_K_M and Q2_K, and
the same ``quantize.imatrix.*`` metadata. On the trained test model the imatrix is llama-imatrix's own; on a
random 8-layer model it is a random one written by ``write_imatrix`` (GGUF and legacy .dat) that lacks an entry,
which exercises the IQ4_XS mix's imatrix-only choice and the missing-entry rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gemma2_convert.cli.main import cli
from gemma2_convert.cli.quantize import cli as quantize_cli
from gemma2_convert.core.errors import ConfigError, UnsupportedError
from gemma2_convert.core.progress import Progress
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix
from gemma2_convert.formats.gguf.importance import imatrix_metadata
from gemma2_convert.formats.gguf.mix import choose_type
from gemma2_convert.formats.options import ConvertOptions
from gemma2_convert.pipeline.gguf import to_gguf
from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
from tests.gguf_helpers import CONFIGS, write_model
from tests.llama_tools import run_tool

FIX = Path(__file__).parent / "fixtures"
MODEL, CAL = FIX / "gemma2-tiny-trained", FIX / "calibration.txt"
TYPES = {"Q4_0": "q4_0", "Q4_K_M": "q4_k_m", "IQ4_XS": "iq4_xs_mix", "Q3_K_M": "q3_k_m", "Q2_K": "q2_k"}
"""llama-quantize's type -> our --type (Q4_0 with --pure: our q4_0 is every matrix Q4_0)."""
DEEP = CONFIGS["kmix"].replace(num_hidden_layers=8, layer_types=())
"""n/8 = 1: without an imatrix, IQ4_XS gives blk.0.ffn_down Q5_K."""


def llama_quantize(imatrix: Path, src: Path, out: Path, ftype: str) -> Path:
    run_tool("llama-quantize", *(["--pure"] if ftype == "Q4_0" else []), "--imatrix", imatrix, src, out, ftype, "2")
    return out


def differences(ours: Path, theirs: Path) -> list[str]:
    """Every tensor whose type or bytes differ, and every differing ``quantize.imatrix.*`` key."""
    a, b = GGUFFile(ours), GGUFFile(theirs)
    out = [f"{n}: {a.tensors[n].type_name} vs llama.cpp's {t.type_name}" if a.tensors[n].type_name != t.type_name
           else f"{n} ({t.type_name}): {int((a.raw(n) != b.raw(n)).sum())} bytes differ"
           for n, t in b.tensors.items() if a.tensors[n].type_name != t.type_name or not (a.raw(n) == b.raw(n)).all()]
    keys = {k for k in (*a.kv, *b.kv) if k.startswith("quantize.")}
    out += [f"{k}: {a.kv.get(k)!r} vs {b.kv.get(k)!r}" for k in sorted(keys) if a.kv.get(k) != b.kv.get(k)]
    assert set(a.tensors) == set(b.tensors)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The trained test model as F32 GGUF, and llama-imatrix's imatrix of it on the calibration text."""
    d = tmp_path_factory.mktemp("imatrix-use")
    to_gguf(MODEL, d / "f32.gguf", type_name="f32", verify=False)
    run_tool("llama-imatrix", "-m", d / "f32.gguf", "-f", CAL, "-o", d / "imatrix.gguf", "-c", "128",
             "--chunks", "24", "-t", "2")
    return d


@pytest.mark.slow  # llama-imatrix, then five llama-quantize runs and five of ours (~25 s)
@pytest.mark.parametrize("ftype", list(TYPES))
def test_to_gguf_imatrix_is_llama_quantize_byte_for_byte(trained, ftype):
    d = trained
    want = llama_quantize(d / "imatrix.gguf", d / "f32.gguf", d / f"llama-{ftype}.gguf", ftype)
    res = to_gguf(MODEL, d / f"ours-{ftype}.gguf", type_name=TYPES[ftype], imatrix=d / "imatrix.gguf",
                  verify=ftype == "IQ4_XS")
    assert differences(res.output, want) == []
    assert GGUFFile(res.output).kv["quantize.imatrix.chunks_count"] == 24
    assert ftype != "IQ4_XS" or res.report.passed


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """A random 8-layer model, its F32 GGUF, and a random imatrix without an entry for blk.3.ffn_up, as GGUF
    and as legacy .dat."""
    d = tmp_path_factory.mktemp("imatrix-deep")
    model = write_model(d / "model", DEEP, seed=5)
    to_gguf(model, d / "f32.gguf", type_name="f32", verify=False)
    g = torch.Generator().manual_seed(0)
    entries = {}
    for name, t in GGUFFile(d / "f32.gguf").tensors.items():
        if name.startswith("blk.") and len(t.dims) == 2 and name != "blk.3.ffn_up.weight":
            spread = torch.exp(torch.randn(t.dims[0], generator=g) * 2)  # importance over several decades
            entries[name] = ImatrixEntry((spread * 1000).float(), torch.tensor([1000.0]))
    im = Imatrix(entries, ["random.txt"], 4, 250)
    write_imatrix(d / "imatrix.gguf", im)
    write_imatrix(d / "imatrix.dat", im, legacy=True)
    return d


@pytest.mark.slow  # two llama-quantize runs and two of ours on an 8-layer model (~10 s)
@pytest.mark.parametrize("kind", ["gguf", "dat"])
def test_iq4_xs_mix_with_an_imatrix_and_a_missing_entry(deep, kind):
    d, imatrix = deep, deep / f"imatrix.{kind}"
    want = llama_quantize(imatrix, d / "f32.gguf", d / f"llama-iq4-{kind}.gguf", "IQ4_XS")
    warnings: list[str] = []

    class Notes(Progress):
        def warn(self, message: str) -> None:
            warnings.append(message)

    res = to_gguf(d / "model", d / f"ours-iq4-{kind}.gguf", type_name="iq4_xs_mix", imatrix=imatrix, verify=False,
                  progress=Notes())
    assert differences(res.output, want) == []
    assert GGUFFile(res.output).tensors["blk.0.ffn_down.weight"].type_name == "IQ4_XS"  # Q5_K without imatrix
    assert [w for w in warnings if "no importance data for 1 quantized tensor(s)" in w and "blk.3.ffn_up" in w]


def test_the_iq4_xs_rule_that_only_holds_without_an_imatrix():
    shape, n = (256, 256), DEEP.num_hidden_layers
    assert choose_type("blk.0.ffn_down.weight", shape, "iq4_xs_mix", n).qtype == "Q5_K"
    assert choose_type("blk.0.ffn_down.weight", shape, "iq4_xs_mix", n, imatrix=True).qtype == "IQ4_XS"
    assert choose_type("blk.0.ffn_down.weight", shape, "q4_k_m", n, imatrix=True).qtype == "Q6_K"  # unchanged


def test_metadata_is_llama_quantizes(tmp_path):
    im = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(torch.ones(4), torch.ones(1))}, ["d" * 200, "other"], 0, 512)
    meta = dict(imatrix_metadata(tmp_path / "x.gguf", im))
    assert meta["quantize.imatrix.dataset"].value == "d" * 127  # llama.cpp's 128-byte override, NUL included
    assert meta["quantize.imatrix.entries_count"].value == 1
    assert "quantize.imatrix.chunks_count" not in meta  # written only for a positive chunk count


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """A random kmix model and an imatrix whose blk.0.attn_q entry has the wrong length."""
    d = tmp_path_factory.mktemp("imatrix-bad")
    model = write_model(d / "model", CONFIGS["kmix"], seed=2)
    bad = {"blk.0.attn_q.weight": ImatrixEntry(torch.ones(128), torch.ones(1)),
           "token_embd.weight": ImatrixEntry(torch.ones(7), torch.ones(1))}
    write_imatrix(d / "bad.gguf", Imatrix(bad, [], 1, 8))
    return model, d / "bad.gguf"


def test_an_imatrix_of_another_model_is_refused(small, tmp_path):
    model, bad = small
    with pytest.raises(ConfigError, match=r"entry for blk\.0\.attn_q\.weight has 128 values, but its rows have 256 "
                                          r"columns: the imatrix was computed for another model"):
        to_gguf(model, tmp_path / "x.gguf", type_name="q4_k_m", imatrix=bad, verify=False)
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_and_split_options_are_checked(small, tmp_path):
    model, bad = small
    with pytest.raises(ConfigError, match="--imatrix weights the quantization of a GGUF output, not 'hf'"):
        ConvertOptions(to="hf", imatrix=bad)
    runner = CliRunner()
    r = runner.invoke(quantize_cli, [str(model), str(tmp_path / "q"), "--imatrix", str(bad)])
    assert r.exit_code == 2 and "--imatrix is for --format gguf" in r.stderr, r.output
    r = runner.invoke(quantize_cli, [str(model), str(tmp_path / "q"), "--split-max-size", "1M"])
    assert r.exit_code == 2 and "--split-max-size / --split-max-tensors is for --format gguf" in r.stderr, r.output
    r = runner.invoke(quantize_cli, [str(model), str(tmp_path / "q.gguf"), "--format", "gguf", "--method", "rtn",
                                     "--imatrix", str(bad)])
    assert r.exit_code == 2 and "--method rtn does not use one (use --method mse" in r.stderr, r.output
    r = runner.invoke(cli, ["to-gguf", str(model), str(tmp_path / "x.gguf"), "--imatrix", str(tmp_path / "no.gguf")])
    assert r.exit_code == 2 and "does not exist" in r.output


@pytest.mark.slow  # gemma2-quantize twice with verification, llama.cpp runs both (~20 s)
def test_gemma2_quantize_imatrix_split_set_loads_in_llama_cpp(trained, tmp_path):
    import llama_cpp
    d = trained
    want = llama_quantize(d / "imatrix.gguf", d / "f32.gguf", tmp_path / "llama-q4_0.gguf", "Q4_0")
    r = CliRunner().invoke(quantize_cli, [str(MODEL), str(tmp_path / "ours.gguf"), "--format", "gguf", "--imatrix",
                                          str(d / "imatrix.gguf"), "--split-max-tensors", "20", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    parts = sorted(tmp_path.glob("ours-*.gguf"))
    assert [p.name for p in parts] == [f"ours-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert res["output"] == str(parts[0]) and res["output_bytes"] == sum(p.stat().st_size for p in parts)
    theirs = GGUFFile(want)
    for p in parts:  # mse with the imatrix = llama-quantize's Q4_0 search with it; the embedding is kept
        f = GGUFFile(p)
        for name, t in f.tensors.items():
            assert t.type_name != "Q4_0" or (f.raw(name) == theirs.raw(name)).all(), name
    whole = quantize_checkpoint(MODEL, tmp_path / "whole.gguf", QuantizeOptions(4, 32, True, "mse", "gguf",
                                verify=False, imatrix=d / "imatrix.gguf"))
    ids = [2] + torch.randint(3, 2048, (23,), generator=torch.Generator().manual_seed(0)).tolist()

    def logits(path: Path) -> torch.Tensor:
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=32, verbose=False)
        try:
            llm.eval(ids)
            return torch.tensor(llm.scores[:len(ids)])
        finally:
            llm.close()

    assert torch.equal(logits(parts[0]), logits(whole.out))


def test_every_gguf_command_takes_imatrix(small, tmp_path):
    model, _ = small
    im = tmp_path / "im.gguf"
    g = torch.Generator().manual_seed(1)
    write_imatrix(im, Imatrix({f"blk.{i}.{t}.weight": ImatrixEntry(torch.rand(256, generator=g) + 0.01,
                                                                   torch.ones(1))
                               for i in range(4) for t in ("attn_q", "ffn_down")}, ["x.txt"], 3, 64))
    want = to_gguf(model, tmp_path / "api.gguf", type_name="q4_k_m", imatrix=im, verify=False).output
    runner = CliRunner()
    for args in (["to-gguf", str(model), str(tmp_path / "a.gguf"), "--type", "q4_k_m"],
                 ["convert", str(model), str(tmp_path / "b.gguf"), "--to", "gguf", "--type", "q4_k_m"]):
        r = runner.invoke(cli, [*args, "--imatrix", str(im), "--no-verify", "--json"])
        assert r.exit_code == 0, r.output
        assert differences(Path(args[2]), want) == []
        assert GGUFFile(args[2]).kv["quantize.imatrix.entries_count"] == 8
    plain = to_gguf(model, tmp_path / "plain.gguf", type_name="q4_k_m", verify=False).output
    f, p = GGUFFile(want), GGUFFile(plain)  # the imatrix changes the weighted tensors, and only them
    changed = sorted(n for n in f.tensors if not (f.raw(n) == p.raw(n)).all())
    assert changed == sorted(f"blk.{i}.{t}.weight" for i in range(4) for t in ("attn_q", "ffn_down"))
