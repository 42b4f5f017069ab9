"""Property-based fuzzing of the safetensors and GGUF header parsers: random bytes, structured lies and
mutations of valid files raise nothing but ConversionError (FormatError), never hang, and whatever
parses can be read to the last byte."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma2_convert.core.errors import ConversionError
from gemma2_convert.formats.gguf.file import GGUFFile
from gemma2_convert.formats.gguf.values import ValueType, array, string, u32
from gemma2_convert.formats.gguf.writer import TensorPlan, write_gguf
from gemma2_convert.formats.safetensors import DTYPES, SafetensorsFile, write_safetensors
from gemma2_convert.core.lazy import LazyTensor

pytestmark = pytest.mark.slow  # hypothesis at 250 examples a property; the bad-input corpus stays fast

FUZZ = settings(max_examples=250, deadline=2000, suppress_health_check=[HealthCheck.too_slow],
                database=None, derandomize=True)
"""Six properties × 250 examples (about 10 s in all); ``derandomize`` keeps CI reproducible. Raise
max_examples locally for a longer search (18,000 random examples found nothing)."""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _file(work: Path, data: bytes, name: str) -> Path:
    path = work / name
    path.write_bytes(data)
    return path


def parse_safetensors(work: Path, data: bytes) -> None:
    """Parse; if the header is accepted, every tensor must load."""
    try:
        f = SafetensorsFile(_file(work, data, "fuzz.safetensors"))
        for name in f.names():
            f.load(name)
    except ConversionError:
        pass


def parse_gguf(work: Path, data: bytes) -> None:
    """Parse; if the header is accepted, every tensor's bytes must be readable."""
    try:
        f = GGUFFile(_file(work, data, "fuzz.gguf"))
        for name in f.tensors:
            assert len(f.raw(name)) == f.tensors[name].nbytes
    except ConversionError:
        pass


@pytest.fixture(scope="module")
def valid_safetensors(work) -> bytes:
    items = [("a", LazyTensor.of(torch.arange(12, dtype=torch.float32).reshape(3, 4))),
             ("b", LazyTensor.of(torch.ones(5, dtype=torch.bfloat16))), ("c", LazyTensor.of(torch.zeros(0)))]
    path = work / "valid.safetensors"
    write_safetensors(path, items, {"format": "pt", "note": "fuzz"})
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_gguf(work) -> bytes:
    meta = [("general.architecture", string("gemma2")), ("general.alignment", u32(32)),
            ("tokenizer.ggml.tokens", array(ValueType.STRING, ["<pad>", "<eos>", "a b", "ü"])),
            ("tokenizer.ggml.scores", array(ValueType.FLOAT32, [0.0, -1.0, -2.5, 3.0]))]
    plans = [TensorPlan("t.weight", LazyTensor.of(torch.randn(4, 32)), "F32"),
             TensorPlan("q.weight", LazyTensor.of(torch.randn(2, 32)), "Q8_0")]
    path = work / "valid.gguf"
    write_gguf(path, meta, plans, threads=1)
    return path.read_bytes()


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` with a few bytes overwritten (mostly in the header), then possibly truncated or extended."""
    head = min(len(valid), 1024)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, head - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
        return bytes(data[:cut]) + draw(st.binary(max_size=16))

    return build()


# ---- safetensors -----------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=4096))
def test_safetensors_random_bytes(work, data):
    parse_safetensors(work, data)


ints = st.one_of(st.integers(-2, 64), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True), st.text(max_size=3),
                 st.booleans(), st.none())
entries = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=5), ints),
    "shape": st.one_of(st.lists(ints, max_size=9), ints),
    "data_offsets": st.one_of(st.lists(ints, max_size=3), ints),
})


@FUZZ
@given(header=st.dictionaries(st.text(max_size=8), st.one_of(entries, ints, st.dictionaries(st.text(max_size=3), ints)),
                              max_size=6),
       data=st.binary(max_size=256), length_lie=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
def test_safetensors_structured_lies(work, header, data, length_lie):
    raw = json.dumps(header).encode()
    n = len(raw) if length_lie is None else length_lie
    parse_safetensors(work, struct.pack("<Q", n) + raw + data)


@FUZZ
@given(st.data())
def test_safetensors_mutated_valid_file(work, valid_safetensors, data):
    parse_safetensors(work, data.draw(mutations(valid_safetensors)))


# ---- GGUF ------------------------------------------------------------------------------------

@FUZZ
@given(version=st.sampled_from([2, 3, 0, 9]), n_tensors=st.integers(0, (1 << 64) - 1),
       n_kv=st.integers(0, (1 << 64) - 1), body=st.binary(max_size=2048))
def test_gguf_random_body(work, version, n_tensors, n_kv, body):
    parse_gguf(work, b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body)


@FUZZ
@given(st.data())
def test_gguf_small_counts_random_body(work, data):
    n_tensors, n_kv = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4))
    parse_gguf(work, b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + data.draw(st.binary(max_size=1024)))


@FUZZ
@given(st.data())
def test_gguf_mutated_valid_file(work, valid_gguf, data):
    parse_gguf(work, data.draw(mutations(valid_gguf)))
