"""``inspect`` on every format, against golden outputs (tests/golden/inspect_*.txt|json), and each doctor
check on a file that has the problem.

Regenerate the goldens after an intended change with ``python -m tests.test_inspect`` (see
tests/golden/README.md); the diff of tests/golden/ is then the review.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from gemma2_convert import __version__
from gemma2_convert.pipeline.doctor import Facts, diagnose
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.core.progress import Progress
from gemma2_convert.pipeline.inspect import Inspection, inspect_path
from gemma2_convert.core.lazy import LazyTensor
from reference.config import Gemma2Config
from tests.badinputs.corpus import CFG, tensors

GOLDEN = Path(__file__).parent / "golden"
ORBAX = Path(__file__).parent / "fixtures" / "orbax" / "gemma2_2b_layout" / "kaggle"
WIDTH = 110


# ---- artifacts -------------------------------------------------------------------------------

def write_hf(d: Path, tok: Path, sd: dict[str, torch.Tensor] | None = None, cfg: Gemma2Config = CFG) -> Path:
    from gemma2_convert.formats.hf import write_hf_dir

    d.mkdir(parents=True)
    items = [(k, LazyTensor.of(v)) for k, v in (sd if sd is not None else tensors()).items()]
    write_hf_dir(d, cfg, items, tokenizer=tok, provenance={"command": "test"})
    return d


def write_stale_gguf(path: Path, tok: Path, cfg: Gemma2Config = CFG, plus_one: bool = True,
                     sd: dict[str, torch.Tensor] | None = None) -> Path:
    """A gemma2 GGUF as converters wrote them before mid-2024, with gguf-py's own writer: no softcaps, no
    sliding window, no key/value length, <end_of_turn> left USER_DEFINED, no provenance."""
    import gguf

    from gemma2_convert.formats.gguf.names import gguf_name, is_norm
    from gemma2_convert.formats.tokenizer.spm import read_spm

    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_name("stale")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(0)
    spm = read_spm(tok)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.text for p in spm.pieces])
    w.add_token_scores([p.score for p in spm.pieces])
    w.add_token_types([int(p.type) for p in spm.pieces])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    for name, t in (sd if sd is not None else tensors()).items():
        value = t.float() + 1 if is_norm(name) and plus_one else t.float()
        w.add_tensor(gguf_name(name), value.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_artifacts(root: Path) -> dict[str, tuple[Path, ShapeOptions | None]]:
    """One small checkpoint per format (the corpus model, seed 0), and the stale GGUF."""
    from gemma2_convert.formats.single_safetensors import write_single_safetensors
    from gemma2_convert.pipeline.gguf import to_gguf
    from gemma2_convert.pipeline.quantize import QuantizeOptions, quantize_checkpoint
    from gemma2_convert.formats.testing import write_orig_ckpt
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_spm(root / "tokenizer.model", CFG.vocab_size)
    hf = write_hf(root / "hf", tok)
    single = root / "single" / "model.safetensors"
    single.parent.mkdir()
    write_single_safetensors(single, CFG, [(k, LazyTensor.of(v)) for k, v in tensors().items()],
                             provenance={"command": "test"})
    orig = root / "orig"
    write_orig_ckpt(orig / "model.ckpt", tensors(), CFG)
    (orig / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    gguf = root / "model-q8_0.gguf"
    to_gguf(hf, gguf, type_name="q8_0", tokenizer=tok, verify=False)
    quantized = root / "hf-int4"
    quantize_checkpoint(hf, quantized, QuantizeOptions(bits=4, group_size=32, method="rtn", verify=False))
    arts: dict[str, tuple[Path, ShapeOptions | None]] = {
        "hf": (hf, None), "safetensors": (single, None), "gemma_pytorch": (orig / "model.ckpt",
                                                                           ShapeOptions(config=orig / "config.json")),
        "gguf": (gguf, None), "gguf_stale": (write_stale_gguf(root / "stale.gguf", tok), None),
        "hf_quantized": (quantized, None),
    }
    if ORBAX.is_dir():
        shutil.copytree(ORBAX, root / "kaggle")
        arts["orbax"] = (root / "kaggle", ShapeOptions(config=ORBAX.parent / "hf" / "config.json"))
    return arts


# ---- rendering and normalisation ---------------------------------------------------------------

def stable(v: object, root: Path) -> object:
    """Metadata values that change between runs or releases, replaced: the temporary directory, the
    converter version, digests (sha256, XXH3-128)."""
    if isinstance(v, dict):
        return {k: stable(x, root) for k, x in v.items()}
    if isinstance(v, list):
        return [stable(x, root) for x in v]
    if isinstance(v, str):
        v = v.replace(str(root), "<tmp>").replace(__version__, "<version>")
        return re.sub(r"\b[0-9a-f]{32}\b", "<xxh3_128>", re.sub(r"[0-9a-f]{64}", "<sha256>", v))
    return v


def as_text(ins: Inspection) -> str:
    from rich.console import Console

    from gemma2_convert.cli.render import render_inspection

    buf = io.StringIO()
    render_inspection(ins, Console(file=buf, width=WIDTH, color_system=None, force_terminal=False, highlight=False))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def as_json(ins: Inspection) -> str:
    return json.dumps(ins.to_json(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def goldens(name: str, path: Path, options: ShapeOptions | None, root: Path) -> dict[str, str]:
    """The text and JSON inspection of ``path``, given relative to ``root`` so that no temporary path shows."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ins = inspect_path(path.relative_to(root), options=options)
    finally:
        os.chdir(cwd)
    ins.metadata, ins.provenance = stable(ins.metadata, root), stable(ins.provenance, root)
    return {f"inspect_{name}.txt": as_text(ins), f"inspect_{name}.json": as_json(ins)}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    return root, build_artifacts(root)


FORMATS = ("hf", "safetensors", "gemma_pytorch", "gguf", "gguf_stale", "hf_quantized", "orbax")


@pytest.mark.parametrize("name", FORMATS)
def test_inspect_matches_golden(name, artifacts):
    root, arts = artifacts
    if name == "orbax":
        pytest.importorskip("tensorstore")
    path, options = arts[name]
    for fname, got in goldens(name, path, options, root).items():
        want = (GOLDEN / fname).read_text(encoding="utf-8")
        assert got == want, f"{fname} differs; if intended, run `python -m tests.test_inspect` and review the diff"


def test_stale_gguf_findings(artifacts):
    _, arts = artifacts
    ins = inspect_path(arts["gguf_stale"][0])
    codes = {f.code: f.level for f in ins.findings}
    assert codes == {"gguf-no-softcap": "warning", "gguf-no-sliding-window": "warning",
                     "gguf-no-key-length": "warning", "gguf-depth-no-fold": "warning",
                     "end-of-turn-not-control": "warning", "no-provenance": "info"}, codes
    assert not inspect_path(arts["gguf"][0]).findings  # ours: nothing to report


def test_cli_json_is_the_library_json(artifacts, tmp_path):
    from click.testing import CliRunner

    from gemma2_convert.cli.main import cli

    _, arts = artifacts
    r = CliRunner().invoke(cli, ["inspect", str(arts["gguf"][0]), "--json"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert json.loads(r.stdout) == json.loads(as_json(inspect_path(arts["gguf"][0])))


# ---- each doctor check on a file that has the problem --------------------------------------------

def _codes(path: Path, **kw: object) -> dict[str, str]:
    return {f.code: f.message for f in inspect_path(path, **kw).findings}


def test_gguf_whose_fingerprint_was_never_filled_in(artifacts, tmp_path):
    import gemma2_convert.formats.gguf.metadata as gm
    from gemma2_convert.formats.gguf.reader import GGUFFile
    from gemma2_convert.formats.gguf.writer import patch_string
    from gemma2_convert.formats.gguf.output import HASH_PLACEHOLDER

    _, arts = artifacts
    path = tmp_path / "unfinished.gguf"
    shutil.copyfile(arts["gguf"][0], path)
    patch_string(path, gm.K_SOURCE_FINGERPRINT, GGUFFile(path).kv[gm.K_SOURCE_FINGERPRINT], HASH_PLACEHOLDER)
    assert _codes(path)["incomplete-write"].startswith("the source fingerprint was never filled in")


@pytest.mark.parametrize("kv, bad", [({"gemma2_convert.source_sha256": "sha256-pending-" + "0" * 49}, True),
                                     ({"gemma2_convert.source_sha256": "ab" * 32}, False),
                                     ({"gemma2_convert.source_xxh3_128": "ab" * 16}, False)])
def test_fingerprint_keys_old_and_new(kv, bad):
    assert any(f.code == "incomplete-write" for f in diagnose(_facts(gguf_kv=kv))) == bad


def test_untied_lm_head(artifacts, tmp_path):
    root, _ = artifacts
    sd = tensors()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] * 1.5
    hf = write_hf(tmp_path / "untied", root / "tokenizer.model", sd)
    msg = _codes(hf)["untied-lm-head"]
    assert re.match(r"lm_head\.weight differs from the embedding \(max \|Δ\| [\d.]+\): the model was trained with an "
                    "untied head", msg), msg
    from click.testing import CliRunner

    from gemma2_convert.cli.main import cli

    r = CliRunner().invoke(cli, ["inspect", str(hf)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {hf}: untied-lm-head: lm_head.weight differs from the embedding")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    assert "stray-lm-head" in _codes(write_hf(tmp_path / "stray", root / "tokenizer.model", sd))


def test_gguf_norms_without_the_plus_one(artifacts, tmp_path):
    root, _ = artifacts
    msg = _codes(write_stale_gguf(tmp_path / "x.gguf", root / "tokenizer.model", plus_one=False))["gguf-norms-near-zero"]
    assert msg.startswith("the norm weights are centred near 0 (median of means")


def test_hf_norms_stored_with_the_plus_one(artifacts, tmp_path):
    root, _ = artifacts
    sd = {k: v + 1 if k.endswith("norm.weight") else v for k, v in tensors().items()}
    assert "norms-near-one" in _codes(write_hf(tmp_path / "plus-one", root / "tokenizer.model", sd))


def test_gguf_without_key_length_and_head_dim_not_hidden_over_heads(artifacts, tmp_path):
    root, _ = artifacts
    cfg = CFG.replace(head_dim=16, query_pre_attn_scalar=16)  # hidden / heads = 32 ≠ 16
    from gemma2_convert.formats.synthetic import random_tensors

    sd = {k: v.load() for k, v in random_tensors(cfg, 0, torch.float32).items()}
    codes = _codes(write_stale_gguf(tmp_path / "x.gguf", root / "tokenizer.model", cfg, sd=sd))
    assert codes["gguf-no-key-length"].startswith("no gemma2.attention.key_length: llama.cpp then takes head_dim = "
                                                  "embedding_length / head_count = 32, but attn_q holds 2 heads of 16")


def _facts(**kw: object) -> Facts:
    return Facts(Path("m"), "hf", None, **kw)


def test_nine_b_config_with_the_launch_scalar():
    [f] = [f for f in diagnose(_facts(variant="9b", raw_config={"query_pre_attn_scalar": 224}))
           if f.code == "query-pre-attn-scalar"]
    assert f.message.startswith("a 9B config with query_pre_attn_scalar 224, not 256 — the launch value")
    assert not [f for f in diagnose(_facts(variant="9b", raw_config={"query_pre_attn_scalar": 256}))
                if f.code == "query-pre-attn-scalar"]


@pytest.mark.parametrize("raw, bad", [({"bos_token_id": 2, "eos_token_id": [1, 107]}, False),
                                      ({"bos_token_id": 1, "eos_token_id": 2}, True),
                                      ({"bos_token_id": 2, "eos_token_id": 106}, True)])
def test_special_token_ids(raw, bad):
    assert any(f.code == "special-ids" for f in diagnose(_facts(raw_config=raw))) == bad


def test_end_of_turn_not_special_in_hf(artifacts, tmp_path):
    root, _ = artifacts
    hf = write_hf(tmp_path / "hf", root / "tokenizer.model")
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    entry = next(e for e in cfg["added_tokens_decoder"].values() if e["content"] == "<end_of_turn>")
    entry["special"] = False
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "end-of-turn-not-special" in _codes(hf)


def test_config_with_softcap_disabled(artifacts, tmp_path):
    root, _ = artifacts
    hf = write_hf(tmp_path / "hf", root / "tokenizer.model")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["attn_logit_softcapping"] = None
    (hf / "config.json").write_text(json.dumps(cfg))
    assert _codes(hf)["config-no-attn-logit-softcapping"].startswith("the config sets attn_logit_softcapping to null")


def test_scan_finds_nonfinite_and_float16_overflow(artifacts, tmp_path):
    root, _ = artifacts
    sd = tensors()
    sd["model.layers.0.mlp.up_proj.weight"][0, 1] = float("nan")
    sd["model.layers.1.mlp.up_proj.weight"][2, 2] = 1e6
    hf = write_hf(tmp_path / "hf", root / "tokenizer.model", sd)
    assert "nonfinite" not in _codes(hf)  # reading every tensor is opt-in
    seen: list[str] = []

    class Seen(Progress):
        def advance(self, amount: int = 1, item: str = "") -> None:
            seen.append(item)

    codes = _codes(hf, scan=True, progress=Seen())
    assert codes["nonfinite"] == "tensor 'model.layers.0.mlp.up_proj.weight': 1 NaN and 0 ±Inf value(s), the first " \
                                 "at index [0, 1]"
    assert codes["beyond-float16"].startswith("tensor 'model.layers.1.mlp.up_proj.weight': max |w| 1e+06 is beyond")
    assert len(seen) == len(tensors())


def regenerate(root: Path) -> None:
    """Write every golden file from freshly built artifacts."""
    GOLDEN.mkdir(exist_ok=True)
    for name, (path, options) in build_artifacts(root).items():
        for fname, text in goldens(name, path, options, root).items():
            (GOLDEN / fname).write_text(text, encoding="utf-8")
            print(f"wrote tests/golden/{fname}")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        regenerate(Path(d) / "artifacts")
    sys.exit(0)

