"""Split GGUF (llama.cpp's gguf-split layout): written with --split-max-size / --split-max-tensors, read back
from the first part as the unsplit file, loaded by llama.cpp itself, checked for missing and foreign parts,
and written atomically as a set (an interrupted or failed run leaves no part; --force replaces a set whole)."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gemma2_convert.cli.main import cli
from gemma2_convert.core.errors import (
    ConfigError,
    ConversionError,
    FormatError,
    OutputExistsError,
)
from gemma2_convert.core.units import parse_size
from gemma2_convert.formats import open_checkpoint, output
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.gguf.split import K_SPLIT_SET, SET_PLACEHOLDER, open_set
from gemma2_convert.formats.gguf.values import ValueType
from gemma2_convert.formats.gguf.writer import patch_string
from gemma2_convert.formats.testing import write_orig_ckpt
from gemma2_convert.pipeline.gguf import to_gguf
from gemma2_convert.pipeline.inspect import inspect_path
from gemma2_convert.pipeline.verify import verify_paths
from tests.badinputs.runner import REPO
from tests.gguf_helpers import CONFIGS, first_diff, llama_logits, tensors, write_model

CFG = CONFIGS["mha"]  # 35 tensors, 6 MB in F32
MAX_SIZE = "1M"
SPLIT_KEYS = ["split.no", "split.count", "split.tensors.count", K_SPLIT_SET]


def parts_of(path: Path) -> list[Path]:
    """The parts of the set written for ``path`` (``x.gguf``), or whose first part ``path`` is."""
    prefix = re.sub(r"-00001-of-\d{5}$", "", path.name.removesuffix(".gguf"))
    return sorted(path.parent.glob(f"{prefix}-[0-9]*-of-[0-9]*.gguf"))


def leftovers(out: Path) -> list[str]:
    """Anything an output at ``out`` (a set) could have left: its parts, temporary or set-aside files."""
    prefix = out.name.removesuffix(".gguf")
    starts = (prefix + "-", f".{out.name}.", f".{prefix}-")
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(starts))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("split") / "hf", CFG, seed=3)


@pytest.fixture(scope="module")
def whole(model) -> Path:
    out = model.parent / "whole.gguf"
    to_gguf(model, out, type_name="f32", verify=False)
    return out


@pytest.fixture(scope="module")
def by_size(model) -> Path:
    """The set written with a 1 MB limit, verified as it is written."""
    out = model.parent / "sized.gguf"
    res = to_gguf(model, out, type_name="f32", split_max_size=MAX_SIZE)
    assert res.report is not None and res.report.passed, res.report
    assert res.output == model.parent / res.files[0] == parts_of(out)[0]
    assert res.nbytes == sum(p.stat().st_size for p in parts_of(out))
    return res.output


@pytest.fixture(scope="module")
def by_count(model) -> Path:
    return to_gguf(model, model.parent / "counted.gguf", type_name="f32", split_max_tensors=10, verify=False).output


# ---- the layout ------------------------------------------------------------------------------

def test_parts_by_size_follow_gguf_split(by_size, whole):
    parts = parts_of(by_size)
    n = len(parts)
    assert n >= 3 and [p.name for p in parts] == [f"sized-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    files, ref = [GGUFFile(p) for p in parts], GGUFFile(whole)
    assert all(p.stat().st_size <= parse_size(MAX_SIZE) for p in parts), [p.stat().st_size for p in parts]
    for i, f in enumerate(files):  # gguf-split's keys and types: u16, u16, and i32 = the tensors of the whole model
        assert [f.kv[k] for k in SPLIT_KEYS[:3]] == [i, n, len(ref.tensors)], f.path
        assert [f.kv_types[k][0] for k in SPLIT_KEYS[:3]] == [ValueType.UINT16, ValueType.UINT16, ValueType.INT32]
        assert f.kv[K_SPLIT_SET] == files[0].kv[K_SPLIT_SET] != SET_PLACEHOLDER
    # the first part: every key of the unsplit file (the fingerprint included), then the split keys
    first = files[0].kv
    assert list(first) == [*ref.kv, *SPLIT_KEYS]
    assert {k: v for k, v in first.items() if k not in SPLIT_KEYS} == ref.kv  # same source_xxh3_128 too
    for f in files[1:]:  # later parts: the split keys only
        assert list(f.kv) == SPLIT_KEYS, f.path
    # whole tensors, in the unsplit file's order
    assert [name for f in files for name in f.tensors] == list(ref.tensors)
    assert all(len(f.tensors) for f in files)


def test_parts_by_tensor_count(by_count, whole):
    files = [GGUFFile(p) for p in parts_of(by_count)]
    total = len(GGUFFile(whole).tensors)
    assert [len(f.tensors) for f in files] == [10, 10, 10, total - 30]
    assert [f.path.name for f in files] == [f"counted-{i:05d}-of-00004.gguf" for i in range(1, 5)]


def test_one_part_is_still_a_set(model, whole, tmp_path):
    """A limit the model fits in gives NAME-00001-of-00001.gguf, as gguf-split does: the option means a set."""
    res = to_gguf(model, tmp_path / "m.gguf", type_name="f32", split_max_size="1G", verify=False)
    assert res.files == ["m-00001-of-00001.gguf"] and GGUFFile(res.output).kv["split.count"] == 1
    assert open_checkpoint(res.output).config == open_checkpoint(whole).config


def test_a_tensor_larger_than_the_limit_is_named(model, tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(ConfigError, match=r"tensor 'token_embd\.weight' with the model's metadata takes [\d.]+ KB in a "
                                          r"part of its own, more than --split-max-size 300\.0 KB; a part holds whole "
                                          r"tensors, so choose a larger size"):
        to_gguf(model, out, type_name="f32", split_max_size="300K")
    assert leftovers(out) == []


@pytest.mark.parametrize("options, message", [
    ({"split_max_size": "5X"}, r"--split-max-size: cannot parse size '5X'"),
    ({"split_max_size": "0"}, r"--split-max-size must be positive"),
    ({"split_max_tensors": 0}, r"--split-max-tensors must be at least 1"),
])
def test_bad_limits(model, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        to_gguf(model, tmp_path / "m.gguf", **options)


# ---- reading the set back ----------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["by_size", "by_count"])
def test_read_back_equals_the_unsplit_file(request, whole, fixture):
    first = request.getfixturevalue(fixture)
    a, b = open_checkpoint(whole), open_checkpoint(first)
    assert b.config == a.config and list(b.tensors) == list(a.tensors)
    for name, t in a.tensors.items():
        x, y = t.load(), b.tensors[name].load()
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name}: {first_diff(x, y)}"
    sa, sb = GGUFFile(whole), open_set(first)
    assert all(np.array_equal(sa.raw(n), sb.raw(n)) for n in sa.tensors)
    assert b.parts == tuple(parts_of(first)[1:]) and b.tokenizer_blob == a.tokenizer_blob


def test_verify_and_gguf_to_hf_take_the_first_part(model, by_size, tmp_path):
    rep = verify_paths(model, by_size)
    assert rep.passed and rep.tensors_equal == rep.tensors_total, rep.failures
    r = CliRunner().invoke(cli, ["gguf-to-hf", str(by_size), str(tmp_path / "hf"), "--json"])
    assert r.exit_code == 0, r.output
    back, src = open_checkpoint(tmp_path / "hf"), open_checkpoint(model)
    for name, t in src.tensors.items():
        assert torch.equal(t.load(), back.tensors[name].load()), name


def test_llama_cpp_loads_the_set_with_the_unsplit_logits(whole, by_size, by_count):
    g = torch.Generator().manual_seed(0)
    ids = [2] + torch.randint(3, CFG.vocab_size, (47,), generator=g).tolist()

    def logits(path: Path) -> torch.Tensor:
        return llama_logits(path, ids)

    want = logits(whole)
    assert want.abs().max() > 0
    for first in (by_size, by_count):
        got = logits(first)
        assert torch.equal(got, want), f"{first.name}: {first_diff(got, want)}"


def gguf_py_split(whole: Path, out: Path, max_tensors: int) -> Path:
    """The same model split by gguf-py's GGUFWriter (convert_hf_to_gguf.py's --split-max-tensors): a set
    with no key of ours."""
    import gguf

    f = GGUFFile(whole)
    w = gguf.GGUFWriter(out, f.kv["general.architecture"], split_max_tensors=max_tensors)
    for key, value in f.kv.items():
        vtype, item = f.kv_types[key]
        if key != "general.architecture":
            w.add_key_value(key, list(value) if isinstance(value, bytes) else value, gguf.GGUFValueType(vtype),
                            None if item is None else gguf.GGUFValueType(item))
    for name, info in f.tensors.items():
        w.add_tensor(name, f.raw(name).view(np.float32).reshape(info.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out.with_name(f"{out.stem}-00001-of-{math.ceil(len(f.tensors) / max_tensors):05d}.gguf")


def test_a_set_split_by_gguf_py_reads_back(whole, tmp_path):
    first = gguf_py_split(whole, tmp_path / "theirs.gguf", 8)
    assert K_SPLIT_SET not in GGUFFile(first).kv and GGUFFile(first).kv["split.count"] == 5
    a, b = open_checkpoint(whole), open_checkpoint(first)
    assert all(torch.equal(t.load(), b.tensors[n].load()) for n, t in a.tensors.items())
    second = first.with_name("theirs-00002-of-00005.gguf")  # structural checks catch a part of another split
    other = gguf_py_split(whole, tmp_path / "other.gguf", 9)
    shutil.copyfile(other.with_name("other-00002-of-00004.gguf"), second)
    with pytest.raises(FormatError, match=re.escape(f"{second} is not part 2 of this split GGUF (a part of another "
                                                    "set?): its split.count is 4, expected 5")):
        open_checkpoint(first)


# ---- missing and foreign parts ------------------------------------------------------------------

@pytest.fixture
def copy(by_size, tmp_path) -> Path:
    """A copy of the sized set; returns its first part."""
    for p in parts_of(by_size):
        shutil.copyfile(p, tmp_path / p.name)
    return tmp_path / by_size.name


def test_a_missing_part_is_one_clear_error(copy):
    n = len(parts_of(copy))
    gone = copy.with_name(f"sized-00003-of-{n:05d}.gguf")
    gone.unlink()
    msg = (f"{copy}: part 3 of {n} of this split GGUF is missing: {gone}; every part must lie beside the first, "
           "under the name it was written with")
    with pytest.raises(FormatError) as e:
        open_checkpoint(copy)
    assert str(e.value) == msg
    ins = inspect_path(copy)  # inspect shows the set and flags the part
    assert [(p.name, p.problem != "") for p in ins.parts] == [(f"sized-{i:05d}-of-{n:05d}.gguf", i == 3)
                                                             for i in range(1, n + 1)]
    assert ins.parts[0].nbytes == copy.stat().st_size and ins.parts[2].nbytes == 0
    assert {f.code: f.message for f in ins.errors}["gguf-split-part"] == f"{gone.name}: " + msg.split(": ", 1)[1]
    r = CliRunner().invoke(cli, ["inspect", str(copy)])
    assert r.exit_code == 1 and f"split into {n} parts" in r.stdout, r.output


def test_a_part_of_another_set_is_one_clear_error(copy, tmp_path):
    """A set of another model of the same shape, split the same way: only the set key tells its parts apart."""
    other = write_model(tmp_path / "other", CFG, seed=4)
    theirs = to_gguf(other, tmp_path / "o" / "sized.gguf", type_name="f32", split_max_size=MAX_SIZE, verify=False)
    n = len(theirs.files)
    second = copy.with_name(f"sized-00002-of-{n:05d}.gguf")
    assert GGUFFile(second).tensors.keys() == GGUFFile(theirs.output.with_name(second.name)).tensors.keys()
    shutil.copyfile(theirs.output.with_name(second.name), second)
    ours = GGUFFile(copy).kv[K_SPLIT_SET]
    foreign = GGUFFile(second).kv[K_SPLIT_SET]
    with pytest.raises(FormatError, match=re.escape(
            f"{copy}: {second} is not part 2 of this split GGUF (a part of another set?): its {K_SPLIT_SET} is "
            f"'{foreign}', the first part's '{ours}'")):
        open_checkpoint(copy)
    assert {f.code for f in inspect_path(copy).errors} == {"gguf-split-part", "unreadable"}


def test_a_part_whose_write_never_finished(copy):
    third = copy.with_name(copy.name.replace("-00001-", "-00003-"))
    patch_string(third, K_SPLIT_SET, GGUFFile(third).kv[K_SPLIT_SET], SET_PLACEHOLDER)
    with pytest.raises(FormatError, match=re.escape(f"{third}: its write never finished")):
        open_set(copy)


def test_a_later_part_given_names_the_first(copy):
    second = copy.with_name(copy.name.replace("-00001-", "-00002-"))
    with pytest.raises(FormatError, match=re.escape(f"{second}: this is part 2 of ") + r"\d+" +
                       re.escape(f" of a split GGUF; open its first part, {copy}")):
        open_checkpoint(second)
    # inspect says so, and judges no model metadata that a later part does not hold
    assert {f.code for f in inspect_path(second).findings} == {"gguf-split-part", "unreadable"}


def test_inspect_shows_the_set(by_size):
    ins = inspect_path(by_size)
    parts = parts_of(by_size)
    assert not ins.findings and len(ins.tensors) == len(open_set(by_size).tensors)
    assert [(p.name, p.nbytes, p.problem) for p in ins.parts] == [(q.name, q.stat().st_size, "") for q in parts]
    assert sum(p.tensors for p in ins.parts) == len(ins.tensors)
    assert [p["name"] for p in ins.to_json()["parts"]] == [q.name for q in parts]


def test_a_part_of_the_same_model_in_another_type_is_refused(model, by_count, tmp_path):
    """Same source, same split by tensor count, another --type: same names and keys, another set digest."""
    q8 = to_gguf(model, tmp_path / "counted.gguf", type_name="q8_0", split_max_tensors=10, verify=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in parts_of(by_count):
        shutil.copyfile(p, mixed / p.name)
    second = mixed / "counted-00002-of-00004.gguf"
    shutil.copyfile(q8.output.with_name(second.name), second)
    assert GGUFFile(second).tensors.keys() == GGUFFile(parts_of(by_count)[1]).tensors.keys()
    with pytest.raises(FormatError, match=re.escape(f"{second} is not part 2 of this split GGUF (a part of another "
                                                    f"set?): its {K_SPLIT_SET} is")):
        open_checkpoint(mixed / by_count.name)


def test_a_renamed_first_part_cannot_find_the_others(copy):
    renamed = copy.with_name("renamed.gguf")
    copy.rename(renamed)
    with pytest.raises(FormatError, match=r"renamed\.gguf: the first of \d+ parts of a split GGUF, but not named "
                                          r"NAME-00001-of-\d{5}\.gguf, so the others cannot be found"):
        open_checkpoint(renamed)


# ---- the commands ------------------------------------------------------------------------------

def test_every_gguf_command_takes_the_options(model, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["to-gguf", str(model), str(tmp_path / "a.gguf"), "--type", "f32", "--split-max-size", "2M",
                            "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["files"] == [f"a-0000{i}-of-00004.gguf" for i in range(1, 5)] and res["verify"]["passed"]
    assert res["output"] == str(tmp_path / "a-00001-of-00004.gguf")
    r = runner.invoke(cli, ["convert", str(model), str(tmp_path / "b.gguf"), "--to", "gguf", "--type", "q8_0",
                            "--split-max-tensors", "20", "--no-verify"])
    assert r.exit_code == 0, r.output
    assert [p.name for p in parts_of(tmp_path / "b.gguf")] == ["b-00001-of-00002.gguf", "b-00002-of-00002.gguf"]
    ckpt = write_orig_ckpt(tmp_path / "orig" / "model.ckpt", tensors(CFG, seed=3), CFG)
    (tmp_path / "orig" / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    r = runner.invoke(cli, ["orig-to-gguf", str(ckpt), str(tmp_path / "c.gguf"), "--config",
                            str(tmp_path / "orig" / "config.json"), "--tokenizer",
                            str(model.parent / "hf-tokenizer.model"), "--split-max-size", "1M", "--split-max-tensors",
                            "6", "--type", "f32"])
    assert r.exit_code == 0, r.output
    parts = parts_of(tmp_path / "c.gguf")  # both limits hold: 1 MB (three 256 KB matrices) and 6 tensors
    assert [len(GGUFFile(p).tensors) for p in parts] == [2, 3, 6, 4, 3, 6, 3, 6, 2]
    assert max(p.stat().st_size for p in parts) <= 1_000_000
    r = runner.invoke(cli, ["convert", str(model), str(tmp_path / "d"), "--to", "hf", "--split-max-size", "2M"])
    assert r.exit_code == 2 and "split a GGUF output, not 'hf'; an HF directory is sharded by --max-shard-size" \
        in r.stderr, r.output
    r = runner.invoke(cli, ["to-gguf", str(model), str(tmp_path / "e.gguf"), "--split-max-size", "5X"])
    assert r.exit_code == 2 and "--split-max-size: cannot parse size '5X'" in r.stderr, r.output


# ---- atomic writes, --force ----------------------------------------------------------------------

def digest(paths: list[Path]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths}


def test_an_existing_set_needs_force_and_is_replaced_whole(model, tmp_path):
    out = tmp_path / "m.gguf"
    to_gguf(model, out, type_name="f32", split_max_tensors=10, verify=False)
    old = parts_of(out)
    with pytest.raises(OutputExistsError, match=re.escape(f"{out}: 4 file(s) of an earlier output are there "
                                                          "(m-00001-of-00004.gguf, …); pass --force")):
        to_gguf(model, out, type_name="f32", split_max_tensors=20, verify=False)
    assert parts_of(out) == old
    res = to_gguf(model, out, type_name="f32", split_max_tensors=20, verify=False, force=True)
    assert [p.name for p in parts_of(out)] == res.files == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    assert leftovers(out) == res.files  # the 4-part set is gone, nothing set aside is left
    open_set(res.output)


def test_a_set_may_not_replace_its_input(by_count, tmp_path):
    with pytest.raises(ConversionError, match=r"the output would replace the input"):
        to_gguf(by_count, by_count.with_name("counted.gguf"), type_name="f32", split_max_tensors=5, force=True)


def test_a_failed_write_keeps_the_old_set(model, tmp_path, monkeypatch):
    import gemma2_convert.formats.gguf.output as gguf_output

    out = tmp_path / "m.gguf"
    to_gguf(model, out, type_name="f32", split_max_tensors=10, verify=False)
    before = digest(parts_of(out))

    def fail(*_a, **_k):
        raise ConversionError("boom after the parts were written")

    monkeypatch.setattr(gguf_output, "seal_parts", fail)
    with pytest.raises(ConversionError, match="boom"):
        to_gguf(model, out, type_name="f32", split_max_tensors=7, verify=False, force=True)
    assert digest(parts_of(out)) == before and leftovers(out) == sorted(before)


def test_a_failure_while_placing_the_parts_rolls_back(model, tmp_path, monkeypatch):
    """The renames that place a set: if one fails, the new parts placed so far are removed and the old set is
    moved back."""
    out = tmp_path / "m.gguf"
    to_gguf(model, out, type_name="f32", split_max_tensors=10, verify=False)
    before = digest(parts_of(out))
    real, calls = output.os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 6:  # 4 old parts set aside, 1 new part placed, then the disk says no
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        to_gguf(model, out, type_name="f32", split_max_tensors=7, verify=False, force=True)
    assert calls[5] == "m-00004-of-00005.gguf"  # placed last to first: the first part never appeared
    assert digest(parts_of(out)) == before and leftovers(out) == sorted(before)


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    """A ~100 MB bf16 model of large MLP tensors: its split F16 write and verification take a while."""
    cfg = CFG.replace(hidden_size=1024, intermediate_size=4096, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=3)
    return write_model(tmp_path_factory.mktemp("big") / "hf", cfg, dtype=torch.bfloat16)


def test_an_interrupted_split_write_leaves_nothing(big_hf, tmp_path):
    out = tmp_path / "out.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "gemma2_convert", "to-gguf", str(big_hf), str(out), "--type", "f16",
                             "--split-max-size", "20M"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not any(p.stat().st_size for p in tmp_path.glob(".out.gguf.partial-*/out-00002-of-*.gguf")):  # mid-set
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.002)
    assert parts_of(out) == []
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("warning: ")]
    assert proc.returncode == 130, stderr
    assert lines == [f"error: {out}: interrupted by signal SIGINT; the partial output was removed"], stderr
    assert leftovers(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == []
