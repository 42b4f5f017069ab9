"""The families of bad inputs: each function writes its cases under a directory and returns them."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

from tests.badinputs import mutate as m
from tests.badinputs.corpus import CFG, TB, Case, Good, tensors

def _foreign(d: Path, g: Good) -> list[Case]:
    import gguf

    empty = d / "empty.bin"
    empty.write_bytes(b"")
    (d / "empty-dir").mkdir()
    notes = d / "notes.txt"
    notes.write_text("hello, not a model\n")
    other = d / "photos"
    other.mkdir()
    (other / "README.md").write_text("# holiday photos\n")
    (other / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    llama = d / "llama-hf"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                   "hidden_size": 64, "num_hidden_layers": 2}))
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "model.layers.0.self_attn.q_proj.weight":
               torch.zeros(4, 4)}, str(llama / "model.safetensors"), metadata={"format": "pt"})
    llama_gguf = d / "llama.gguf"
    w = gguf.GGUFWriter(str(llama_gguf), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return [
        Case("empty-file", empty, "any", r"not a (Gemma 2 checkpoint this tool reads|gemma_pytorch checkpoint|GGUF)"
             r"|too short"),
        Case("empty-directory", d / "empty-dir", "any", r"not a Gemma 2 checkpoint this tool reads|directory holds "
             r"neither|is a directory"),
        Case("text-file", notes, "any", r"not a (Gemma 2 checkpoint this tool reads|gemma_pytorch checkpoint|GGUF)"
             r"|too short"),
        Case("other-directory", other, "any", r"not a Gemma 2 checkpoint this tool reads|directory holds neither|"
             r"is a directory"),
        Case("llama-hf-directory", llama, "hf", r"model_type is 'llama', expected 'gemma2'"),
        Case("llama-gguf", llama_gguf, "gguf", r"architecture is 'llama'; only 'gemma2'"),
    ]


def _truncations(d: Path, g: Good) -> list[Case]:
    cases = []
    single_size, ckpt_size, gguf_size = (p.stat().st_size for p in (g.single, g.ckpt, g.gguf))
    for label, size in (("4-bytes", 4), ("mid-header", 200), ("mid-data", single_size // 2), ("last-byte", -1)):
        p = m.truncated(g.single, d / f"trunc-{label}.safetensors", size)
        cases.append(Case(f"safetensors-truncated-{label}", p, "hf", r"too short|header claims \d+ bytes|outside the"))
    for label, size in (("start", 100), ("middle", ckpt_size // 2), ("last-byte", -1)):
        dd = d / f"ckpt-trunc-{label}"
        dd.mkdir()
        p = m.truncated(g.ckpt, dd / "model.ckpt", size)
        cases.append(Case(f"ckpt-truncated-{label}", p, "orig", r"truncated or corrupt", config=g.config))
    for label, size in (("header", 20), ("metadata", 2000), ("middle", gguf_size // 2), ("last-byte", -1)):
        p = m.truncated(g.gguf, d / f"trunc-{label}.gguf", size)
        cases.append(Case(f"gguf-truncated-{label}", p, "gguf", r"truncated|runs past the end|too short"))
    hf = d / "hf-truncated-shard"
    shutil.copytree(g.hf, hf)
    m.truncated(g.hf / "model.safetensors", hf / "model.safetensors", (g.hf / "model.safetensors").stat().st_size - 4)
    cases.append(Case("hf-truncated-shard", hf, "hf", r"model\.safetensors: tensor .* outside the"))
    return cases


def _safetensors_lies(d: Path, g: Good) -> list[Case]:
    header, data = m.st_parts(g.single)
    a, b = m.first_tensors(header)
    raw = json.dumps(header).encode()

    def lie(name: str, change, problem: str, lying: bool = False) -> Case:
        return Case(f"safetensors-{name}", m.st_lie(g.single, d / f"{name}.safetensors", change), "hf", problem,
                    lying=lying)

    def entry(name: str, **kw: object):
        return lambda h: h[name].update(kw)

    deep = b'{"__metadata__":' + b'{"a":' * 5000 + b'"x"' + b"}" * 5001
    cases = [
        Case("safetensors-header-claims-1TB", m.st_write(d / "len-1tb.safetensors", raw, data, length=TB), "hf",
             r"header claims 1099511627776 bytes but the file has", lying=True),
        Case("safetensors-header-longer-than-file", m.st_write(d / "len-long.safetensors", raw, data,
                                                                length=len(raw) + len(data) + 1), "hf",
             r"header claims \d+ bytes but the file has"),
        lie("tensor-claims-1TB", entry(a, shape=[1 << 18, 1 << 20], data_offsets=[0, TB]),
            rf"tensor '{a}': data_offsets \[0, {TB}\] outside the \d+-byte data buffer", lying=True),
        lie("overlapping-offsets", overlap(header, a, b), r"overlap in the data buffer"),
        lie("negative-offset", entry(a, data_offsets=[-8, header[a]["data_offsets"][1] - 8]), r"outside the"),
        lie("shape-product-overflows", entry(a, shape=[1 << 40, 1 << 40, 1 << 40]),
            rf"tensor '{a}': F32\[1099511627776, .*\] needs \d+ bytes, data_offsets span"),
        lie("shape-not-ints", entry(a, shape=[2.5, -1]), r"is not a list of non-negative ints"),
        lie("unknown-dtype", entry(a, dtype="F128"), rf"tensor '{a}': unknown dtype 'F128'"),
        lie("metadata-not-strings", lambda h: h["__metadata__"].update(format=7), r"__metadata__ must map strings"),
        Case("safetensors-non-utf8", m.st_write(d / "latin1.safetensors", b'{"caf\xe9": 1}', data), "hf",
             r"header is not valid UTF-8"),
        Case("safetensors-deeply-nested", m.st_write(d / "deep.safetensors", deep, b""), "hf",
             r"nested deeper than 8 levels"),
        Case("safetensors-not-an-object", m.st_write(d / "list.safetensors", b"[1, 2, 3]", b""), "hf",
             r"header is not a JSON object"),
        Case("safetensors-not-json", m.st_write(d / "garbage.safetensors", b"{not json", b""), "hf",
             r"header is not valid JSON"),
    ]
    hf = d / "hf-overlap"
    shutil.copytree(g.hf, hf)
    h, _ = m.st_parts(g.hf / "model.safetensors")
    x, y = m.first_tensors(h)
    m.st_lie(g.hf / "model.safetensors", hf / "model.safetensors", overlap(h, x, y))
    cases.append(Case("hf-overlapping-offsets", hf, "hf", r"model\.safetensors: tensors .* overlap"))
    return cases


def overlap(header: dict, a: str, b: str):
    """A header change moving tensor ``b`` 4 bytes into tensor ``a`` (same size, inside the buffer)."""
    begin = header[a]["data_offsets"][0] + 4
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    return lambda h: h[b].update(data_offsets=[begin, begin + size])


def _gguf_lies(d: Path, g: Good) -> list[Case]:
    def lie(name: str, edit, problem: str, lying: bool = False) -> Case:
        return Case(f"gguf-{name}", m.edited(g.gguf, d / f"{name}.gguf", edit), "gguf", problem, lying=lying)

    first = "token_embd.weight"
    dims = lambda data: m.gguf_tensor_info_pos(data, first)[0] + 4  # noqa: E731  (first u64 of the dims)
    offset = lambda data: m.gguf_tensor_info_pos(data, "blk.0.attn_q.weight")[1]  # noqa: E731
    ndims = lambda data: m.gguf_tensor_info_pos(data, first)[0]  # noqa: E731
    type_id = lambda data: m.gguf_tensor_info_pos(data, first)[1] - 4  # noqa: E731
    tokens = lambda data: m.gguf_key_value_pos(data, "tokenizer.ggml.tokens") + 4  # noqa: E731  (the count)
    return [
        lie("bad-magic", lambda b: b.__setitem__(slice(0, 4), b"GGUX"), r"not a (GGUF file|Gemma 2 checkpoint)"),
        lie("version-9", m.gguf_set("<I", lambda _: 4, 9), r"GGUF version 9 is not supported"),
        lie("tensor-count-2e50", m.gguf_set("<Q", lambda _: 8, 1 << 50), r"more than a \d+-byte file can hold",
            lying=True),
        lie("metadata-count-2e60", m.gguf_set("<Q", lambda _: 16, 1 << 60), r"more than a \d+-byte file can hold",
            lying=True),
        lie("key-length-1TB", m.gguf_set("<Q", lambda _: 24, TB), r"string length \d+ is implausible|truncated",
            lying=True),
        lie("string-array-past-end", m.gguf_set("<Q", tokens, 1 << 40), r"array of \d+ strings cannot fit",
            lying=True),
        lie("alignment-not-power-of-two", m.gguf_set("<I", lambda b: m.gguf_key_value_pos(b, "general.alignment"),
                                                      48), r"general\.alignment 48 is not a power of two"),
        lie("misaligned-offset", m.gguf_set("<Q", offset, 8), r"data offset 8 is not aligned to 32"),
        lie("overlapping-tensors", m.gguf_set("<Q", offset, 0), r"overlap in the data section"),
        lie("tensor-claims-1TB", lambda b: struct.pack_into("<QQ", b, dims(bytes(b)), 1 << 20, 1 << 18),
            r"'token_embd\.weight': data \[\d+, \d+\) runs past the end", lying=True),
        lie("unknown-ggml-type", m.gguf_set("<I", type_id, 99), r"unknown ggml type id 99"),
        lie("nine-dimensions", m.gguf_set("<I", ndims, 9), r"has 9 dimensions"),
    ]


def _pickles(d: Path, g: Good) -> list[Case]:
    import pickle

    from gemma2_convert.formats.testing import orig_state_dict

    marker = d / "PWNED"
    evil_dir, legacy_dir, hf_names_dir, junk_dir, zip_dir, nt_dir, other_dir = (d / n for n in (
        "ckpt-evil", "ckpt-legacy", "ckpt-hf-names", "ckpt-foreign-zip", "ckpt-missing-record", "ckpt-not-tensors",
        "ckpt-resnet"))
    for x in (evil_dir, legacy_dir, hf_names_dir, junk_dir, zip_dir, nt_dir, other_dir):
        x.mkdir()
    torch.save({"model_state_dict": {"fc.weight": torch.zeros(2, 2)}}, other_dir / "model.ckpt")
    sd = orig_state_dict(tensors(), CFG)
    torch.save({"model_state_dict": sd, "extra": Payload(marker)}, evil_dir / "model.ckpt")
    (legacy_dir / "model.ckpt").write_bytes(pickle.dumps({"model_state_dict": {}}, protocol=2))
    torch.save({"model_state_dict": tensors()}, hf_names_dir / "model.ckpt")
    import zipfile

    with zipfile.ZipFile(junk_dir / "model.ckpt", "w") as z:
        z.writestr("archive/readme.txt", "not a torch archive")
    m.zip_without(g.ckpt, zip_dir / "model.ckpt", lambda n: n.endswith("/data/0"))
    torch.save({"model_state_dict": {**sd, "step": 1000}}, nt_dir / "model.ckpt")
    return [
        Case("ckpt-pickle-runs-code", evil_dir / "model.ckpt", "orig", r"refused: the pickle references code .*"
             r"nothing in the file was run", config=g.config, marker=marker),
        Case("ckpt-legacy-pickle", legacy_dir / "model.ckpt", "orig", r"legacy \(pre-zip\) torch\.save format",
             config=g.config),
        Case("ckpt-hf-names", hf_names_dir / "model.ckpt", "orig", r"holds transformers \(HF\) tensor names",
             config=g.config),
        Case("ckpt-zip-without-data-pkl", junk_dir / "model.ckpt", "orig", r"corrupt checkpoint|not a gemma_pytorch|"
             r"data\.pkl", config=g.config),
        Case("ckpt-zip-missing-record", zip_dir / "model.ckpt", "orig", r"corrupt|missing|data/0",
             config=g.config),
        Case("ckpt-entry-not-a-tensor", nt_dir / "model.ckpt", "orig", r"not tensors: \['step'\]", config=g.config),
        Case("ckpt-another-model", other_dir / "model.ckpt", "orig", r"not a Gemma 2 checkpoint: no embedder\.weight",
             config=g.config),
    ]


class Payload:
    """Unpickling this would run ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _indexes(d: Path, g: Good) -> list[Case]:
    hf = d / "hf-missing-shard"
    shutil.copytree(g.hf_sharded, hf)
    shard = sorted(hf.glob("model-*.safetensors"))[-1]
    shard.unlink()
    orig = d / "orig-missing-shard"
    shutil.copytree(g.orig_sharded, orig)
    (sorted(orig.glob("pytorch_model-*.bin"))[-1]).unlink()
    bad_index = d / "hf-bad-index"
    shutil.copytree(g.hf_sharded, bad_index)
    (bad_index / "model.safetensors.index.json").write_text('{"weight_map": ')
    return [
        Case("hf-index-missing-shard", hf, "hf", rf"index points at missing shard\(s\): {shard.name}"),
        Case("orig-index-missing-shard", orig, "orig", r"pytorch_model\.bin\.index\.json: index names shard\(s\) "
             r"outside the directory or missing", config=g.config),
        Case("hf-index-not-json", bad_index, "hf", r"malformed index \(JSONDecodeError"),
    ]


def _nonfinite(d: Path, g: Good) -> list[Case]:
    from gemma2_convert.formats.gguf.reader import GGUFFile
    from gemma2_convert.formats.testing import write_orig_ckpt

    hf = d / "hf-nan"
    shutil.copytree(g.hf, hf)
    name = "model.layers.1.mlp.up_proj.weight"
    m.st_set_values(g.hf / "model.safetensors", hf / "model.safetensors", name, [math.nan, 1.0, math.nan])
    sd = tensors()
    sd["model.layers.0.mlp.down_proj.weight"][3, 5] = math.inf
    (d / "orig-inf").mkdir()
    ckpt = write_orig_ckpt(d / "orig-inf" / "model.ckpt", sd, CFG)
    shutil.copy(g.tokenizer, d / "orig-inf" / "tokenizer.model")
    info = GGUFFile(g.gguf).tensors["blk.0.ffn_gate.weight"]
    gguf = m.edited(g.gguf, d / "nan.gguf", lambda b: struct.pack_into("<f", b, info.offset + 4 * 7, math.nan))
    return [
        Case("hf-nan-weight", hf, "hf", rf"tensor '({name}|blk\.1\.ffn_up\.weight)': 2 NaN and 0 ±Inf|not finite"),
        Case("ckpt-inf-weight", ckpt, "orig-config", r"tensor '(model\.layers\.0\.mlp\.down_proj\.weight|blk\.0\.ffn_down"
             r"\.weight)': 0 NaN and 1 ±Inf value\(s\), the first at index \[3, 5\]|not finite", config=g.config),
        Case("gguf-nan-weight", gguf, "gguf", r"tensor '(blk\.0\.ffn_gate\.weight|model\.layers\.0\.mlp\.gate_proj"
             r"\.weight)': 1 NaN and 0 ±Inf|not finite"),
    ]


ORBAX_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "orbax"


def _orbax_lies(d: Path, g: Good) -> list[Case]:
    """Copies of the committed Orbax fixtures (OCDBT, and one zarr directory per array) whose zarr headers
    or chunk data lie: each fails when the checkpoint is opened, before any array is read. Empty without
    tensorstore (the family's tests skip)."""
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return []

    def copy(name: str, fixture: str = "gemma2_2b_layout/kaggle/gemma2-tiny") -> Path:
        shutil.copytree(ORBAX_FIXTURES / fixture, d / name)
        return d / name

    linear, leaf = "transformer/layer_0/mlp/linear.w", ("transformer/layer_0/mlp/linear", "w")
    for name, changes in (("zarr-shape", {"shape": [40, 8]}), ("zarr-dtype", {"dtype": "<f4"}),
                          ("zarr-chunks", {"chunks": [20, 16]}), ("zarr-1tb", {"shape": [1 << 40, 16]})):
        m.orbax_set_zarray(copy(name), linear, **changes)
    m.orbax_set_write_shape(d / "zarr-1tb", leaf, [1 << 40, 16])
    data = max((copy("data-truncated") / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    m.truncated(data, data, data.stat().st_size // 2)
    (copy("chunk-missing", "mha_nested_zarr/ckpt") / "layer_0.mlp.linear" / "0.0").unlink()
    chunk = copy("chunk-not-zstd", "mha_nested_zarr/ckpt") / "layer_0.mlp.linear" / "0.0"
    chunk.write_bytes(bytes(chunk.stat().st_size))
    lin = r"array transformer/layer_0/mlp/linear\.w: "
    return [
        Case("orbax-zarr-shape-contradicts-metadata", d / "zarr-shape", "orbax",
             lin + r"its zarr header says shape \[40, 8\], but _METADATA says \[40, 16\] was written"),
        Case("orbax-zarr-dtype-contradicts-data", d / "zarr-dtype", "orbax",
             lin + r"chunk 0\.0 holds 1280 bytes, but its zarr header \(<f4, chunks \[40, 16\]\) needs 2560"),
        Case("orbax-zarr-chunks-contradict-data", d / "zarr-chunks", "orbax", lin + r"1 of 2 chunks missing \(1\.0\)"),
        Case("orbax-zarr-claims-1TB", d / "zarr-1tb", "orbax", lin + r"at least \d+ of \d+ chunks missing",
             lying=True),
        Case("orbax-data-file-truncated", d / "data-truncated", "orbax",
             r"cannot read array transformer/.*: chunk [\d.]+ .*the data is damaged or incomplete"),
        Case("orbax-chunk-missing", d / "chunk-missing", "orbax", lin + r"1 of 1 chunks missing \(0\.0\)"),
        Case("orbax-chunk-not-zstd", d / "chunk-not-zstd", "orbax", lin + r"chunk 0\.0 is not a zstd frame"),
    ]


FAMILIES = (_foreign, _truncations, _safetensors_lies, _gguf_lies, _pickles, _indexes, _nonfinite, _orbax_lies)
FAMILY_NAMES = tuple(f.__name__.strip("_") for f in FAMILIES)


