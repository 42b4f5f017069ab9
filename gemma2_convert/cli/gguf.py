"""``to-gguf``, ``orig-to-gguf``, ``gguf-to-hf``: thin click commands over ``gguf_convert``, and the demo's GGUF step."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gemma2_convert.cli.main import _print_report, _print_result, _shape, _warn, cli, safety_options, shape_options
from gemma2_convert.pipeline.demo import DemoRow
from gemma2_convert.formats.gguf.mix import GGUF_TYPES

LLAMA_CPP_MAX_ABS = 5e-3
"""llama.cpp (F32 GGUF) vs the reference in float32: the acceptance bound on max |Δ logits|."""


def gguf_options(fn):
    """--type, --tokenizer, --verify/--no-verify, --force, --json."""
    opts = [
        click.option("--type", "type_name", type=click.Choice(list(GGUF_TYPES), case_sensitive=False), default="f16",
                     show_default=True, help="Tensor type. f32/f16/bf16/q8_0/q4_0/q4_1/q5_0/q5_1/q4_k/q5_k/q6_k: "
                     "every matrix in that type (norms stay F32); q4_k_m/q5_k_m: llama-quantize's mixes "
                     "(tied embedding Q6_K, more bits for half of attn_v/ffn_down)."),
        click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="SentencePiece tokenizer.model; default: the one next to the source (a GGUF source "
                          "keeps its own vocabulary)."),
        click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
                     help="Read the GGUF back and compare tensors and reference logits with the source; on "
                          "failure nothing is left at the output path."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Threads quantizing in parallel. Default: every CPU this process may use."),
        click.option("--force", is_flag=True, help="Replace an existing output (kept until the new one is complete)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return safety_options(fn)


def _print_gguf(res: object, as_json: bool) -> None:
    from gemma2_convert.cli.console import human_bytes, out, table

    if as_json:
        click.echo(json.dumps({
            "output": str(res.output), "type": res.type, "bytes": res.nbytes, "query_fold": res.query_fold,
            "special_types": {c.name: f"{c.qtype} ({c.reason})" for c in res.choices},
            "seconds": round(res.seconds, 3), "warnings": res.warnings,
            "verify": res.report.to_json() if res.report else None}, indent=2))
        return
    c = res.config
    rows = [("size", human_bytes(res.nbytes)), ("type", res.type),
            ("layers / hidden / heads", f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads}q "
                                        f"{c.num_key_value_heads}kv × {c.head_dim}"),
            ("query scale folded into attn_q", "no" if res.query_fold == 1 else f"× {res.query_fold:.6g}"),
            ("time", f"{res.seconds:.1f}s")]
    rows += [(c.name, f"{c.qtype} ({c.reason})") for c in res.choices[:12]]
    if len(res.choices) > 12:
        rows.append(("…", f"{len(res.choices) - 12} more tensors with a non-default type"))
    out.print(table(f"wrote {res.output}", ["", ""], rows))


@cli.command("to-gguf")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@gguf_options
@click.option("--drop-head", is_flag=True, help="For a classification model: leave its score head out and export "
              "the decoder as a causal LM (llama.cpp's gemma2 has no classification head).")
def to_gguf_cmd(src: Path, out_file: Path, type_name: str, tokenizer: Path | None, verify_output: bool,
                threads: int | None, force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool,
                drop_head: bool) -> None:
    """Write any checkpoint this tool reads (HF directory, single safetensors, gemma_pytorch, GGUF) as a GGUF
    that llama.cpp runs with the model's own logits, at any depth.

    \b
    Examples:
      gemma2-convert to-gguf ./gemma-2-2b-hf gemma-2-2b-f16.gguf
      gemma2-convert to-gguf ./gemma-2-9b-hf gemma-2-9b-Q4_K_M.gguf --type q4_k_m
      gemma2-convert to-gguf gemma-2-2b-f32.gguf gemma-2-2b-q8_0.gguf --type q8_0
    """
    from gemma2_convert.pipeline.gguf import to_gguf

    res = to_gguf(src, out_file, type_name=type_name, tokenizer=tokenizer, verify_output=verify_output,
                  threads=threads, force=force, quiet=quiet or as_json, warn=_warn, drop_head=drop_head,
                  on_report=None if as_json else _print_report, allow_nonfinite=allow_nonfinite)
    _print_gguf(res, as_json)


@cli.command("orig-to-gguf")
@click.argument("ckpt", type=click.Path(exists=True, path_type=Path))
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@shape_options
@gguf_options
def orig_to_gguf_cmd(ckpt: Path, out_file: Path, type_name: str, tokenizer: Path | None, verify_output: bool,
                     threads: int | None, force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool,
                     **shape: object) -> None:
    """Write a gemma_pytorch checkpoint (model.ckpt, sharded or int8) as a GGUF, without an HF directory.

    \b
    Examples:
      gemma2-convert orig-to-gguf gemma-2-2b/model.ckpt gemma-2-2b-q8_0.gguf --type q8_0
      gemma2-convert orig-to-gguf ft.ckpt ft-q5_k_m.gguf --config config.json --type q5_k_m
    """
    from gemma2_convert.pipeline.gguf import orig_to_gguf

    res = orig_to_gguf(ckpt, out_file, shape=_shape(shape), type_name=type_name, tokenizer=tokenizer,
                       verify_output=verify_output, threads=threads, force=force, quiet=quiet or as_json,
                       warn=_warn, on_report=None if as_json else _print_report, allow_nonfinite=allow_nonfinite)
    _print_gguf(res, as_json)


@cli.command("gguf-to-hf")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Output dtype; auto = the source dtype recorded in the GGUF (float32 for "
              "files made elsewhere). Quantized tensors are dequantized.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="tokenizer.model to write the HF tokenizer files from; default: the one next to SRC, else "
                   "the one embedded in the GGUF by to-gguf.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard, e.g. 2GB.")
@click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
              help="Compare the written directory with the GGUF (tensors and reference logits).")
@click.option("--force", is_flag=True, help="Replace an existing output (kept until the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables.")
@safety_options
def gguf_to_hf_cmd(src: Path, out_dir: Path, dtype: str, tokenizer: Path | None, max_shard_size: str,
                   verify_output: bool, force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool) -> None:
    """Convert a gemma2 GGUF (ours or llama.cpp's, any type) to a Hugging Face directory, undoing the +1 on
    norms and any query scale folded into attn_q.

    \b
    Examples:
      gemma2-convert gguf-to-hf gemma-2-2b-f32.gguf ./gemma-2-2b-hf
      gemma2-convert gguf-to-hf gemma-2-2b-Q4_K_M.gguf ./dequantized --dtype bfloat16
    """
    from gemma2_convert.pipeline.gguf import gguf_to_hf

    res = gguf_to_hf(src, out_dir, dtype=dtype, tokenizer=tokenizer, max_shard_size=max_shard_size,
                     verify_output=verify_output, force=force, quiet=quiet or as_json, warn=_warn,
                     on_report=None if as_json else _print_report, allow_nonfinite=allow_nonfinite)
    _print_result(res, as_json)


# ---- demo -------------------------------------------------------------------------------------

def demo_step_gguf(work: Path) -> DemoRow:
    """The demo's HF model → F32 GGUF (verified by reading it back); llama.cpp runs it when installed."""
    from gemma2_convert.pipeline.gguf import to_gguf
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
    from reference.config import Gemma2Config

    src, out = work / "tiny-hf", work / "tiny-f32.gguf"
    tok = src / "tokenizer.model"
    if not tok.is_file():
        tok = make_tiny_spm(work / "tokenizer.model", Gemma2Config.from_json_file(src / "config.json").vocab_size)
    res = to_gguf(src, out, type_name="f32", tokenizer=tok, quiet=True)
    check = f"read back: logits max |Δ| {res.report.max_abs_logits:.2g}" if res.report else "written"
    ok = res.report is None or res.report.passed
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return DemoRow("GGUF (llama.cpp)", out.name, res.nbytes, check + "; llama-cpp-python not installed", ok)
    diff, top1 = llama_cpp_vs_reference(src, out)
    ok = ok and diff <= LLAMA_CPP_MAX_ABS and top1 == 1.0
    return DemoRow("GGUF (llama.cpp)", out.name, res.nbytes,
                   f"{check}; llama.cpp vs reference max |Δ| {diff:.2g}, top-1 {top1:.0%}", ok)


def llama_cpp_vs_reference(ref_path: Path, gguf: Path, n_tokens: int = 64, seed: int = 0) -> tuple[float, float]:
    """max |Δ logits| and top-1 agreement of llama.cpp on ``gguf`` vs the reference (float32) on ``ref_path``,
    over a seeded random sequence of ``n_tokens`` starting with <bos>."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    from reference import Gemma2ForCausalLM

    ref = Gemma2ForCausalLM.from_pretrained(str(ref_path), dtype=torch.float32)
    cfg = ref.config
    g = torch.Generator().manual_seed(seed)
    ids = [cfg.bos_token_id] + torch.randint(3, cfg.vocab_size, (n_tokens - 1,), generator=g).tolist()
    # F32 KV cache and no flash attention: llama.cpp's most exact settings on CPU. swa_full=False
    # (a window-sized cache for the sliding layers) gives the same logits without a warning on stderr.
    llm = Llama(str(gguf), logits_all=True, n_ctx=max(64, n_tokens), n_batch=n_tokens, n_ubatch=n_tokens,
                type_k=0, type_v=0, flash_attn=False, swa_full=False, verbose=False)
    try:
        llm.eval(ids)
        got = torch.from_numpy(np.array(llm.scores[:n_tokens], dtype=np.float32))
    finally:
        llm.close()
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0]
    return (got - want).abs().max().item(), (got.argmax(-1) == want.argmax(-1)).float().mean().item()


__all__ = ["demo_step_gguf", "llama_cpp_vs_reference"]
