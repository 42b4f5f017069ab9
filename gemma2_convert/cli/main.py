"""The ``gemma2-convert`` command: a thin click layer over library functions.

Every command parses its options, then calls one library function. Bad input raises a
ConversionError, printed here as one line on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click

from gemma2_convert import __version__
from gemma2_convert.cli.errors import GuardedGroup, quick_exit


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gemma2-convert")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Convert, quantize and verify Google Gemma 2 checkpoints — exact, streaming, provable.

    \b
    Examples:
      gemma2-convert demo
      gemma2-convert orig-to-hf model.ckpt ./gemma-2-2b-hf --tokenizer tokenizer.model
      gemma2-convert verify ./gemma-2-2b-hf model.ckpt
    """


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's files here (must be empty or absent). Default: a temporary directory, deleted after.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random tiny model.")
@click.option("--quiet", is_flag=True, help="Print only the final table, not each step as it finishes.")
def demo(workdir: Path | None, seed: int, quiet: bool) -> None:
    """Build a tiny Gemma 2, convert it to every layout, quantize it, verify each step, print a table.

    \b
    Example:
      gemma2-convert demo --workdir ./demo-out
    """
    from rich.markup import escape

    from gemma2_convert.cli.console import human_bytes, out, table
    from gemma2_convert.pipeline.demo import run_demo
    from gemma2_convert.formats.output import check_output

    tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="gemma2-demo-")) if tmp else workdir
    if not tmp:
        check_output(work, force=False)
        work.mkdir(parents=True, exist_ok=True)
    try:
        rows = run_demo(work, seed, on_row=lambda r: None if quiet else out.print(
            f"[dim]{'–' if r.skipped else '✓'} {r.step}[/]" if r.ok else f"[red]✗ {r.step}"))
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)
    out.print(table("gemma2-convert demo", ["step", "artifact", "size", "check", "result", "time"], [
        (r.step, r.artifact, human_bytes(r.size) if r.size else "", escape(r.check),  # "[flax]" is not markup
         "[yellow]SKIP" if r.skipped else "[green]PASS" if r.ok else "[red]FAIL", f"{r.seconds:.2f}s") for r in rows]))
    if not all(r.ok for r in rows):
        sys.exit(3)


def shape_options(fn):
    """--variant, --config and the head-layout overrides, shared by the commands that read gemma_pytorch."""
    opts = [
        click.option("--variant", type=click.Choice(["auto", "2b", "9b", "27b"]), default="auto", show_default=True,
                     help="Model size; auto detects it from the tensor shapes. Must agree with the shapes."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="A Gemma 2 config.json, for checkpoints of no published size (fine-tunes, tiny models)."),
        click.option("--num-heads", type=int, default=None, help="Query heads N (instead of --config)."),
        click.option("--num-kv-heads", type=int, default=None, help="Key/value heads K (instead of --config)."),
        click.option("--head-dim", type=int, default=None, help="Per-head width D (instead of --config)."),
        click.option("--query-pre-attn-scalar", type=float, default=None,
                     help="Attention scores × this^-1/2; 256 for 2b/9b, 144 for 27b. Needed with the head flags "
                          "for unpublished shapes."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _shape(kw: dict) -> object:
    from gemma2_convert.formats.orig_config import ShapeOptions

    return ShapeOptions(kw.pop("variant", "auto"), kw.pop("config_path"), kw.pop("num_heads"),
                        kw.pop("num_kv_heads"), kw.pop("head_dim"), kw.pop("query_pre_attn_scalar"))


def safety_options(fn):
    """--allow-nonfinite and --quiet, shared by every command that writes."""
    opts = [
        click.option("--allow-nonfinite", is_flag=True,
                     help="Write weights holding NaN/Inf (or overflowing float16) with a warning, instead of "
                          "refusing them with an error naming the tensor."),
        click.option("--quiet", is_flag=True, help="No progress bar (also off when stderr is not a terminal)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def convert_options(fn):
    """--dtype, --verify/--no-verify, --force, --json, --allow-nonfinite, --quiet: the orig-to-* commands."""
    opts = [
        click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
                     show_default=True, help="Output dtype; auto keeps the source's (int8 is dequantized to the "
                     "dtype of its scales). float16 warns: Gemma 2 activations overflow it."),
        click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
                     help="Reload the output, compare every tensor and the reference logits with the source; "
                          "on failure nothing is left at the output path."),
        click.option("--force", is_flag=True, help="Replace an existing output (kept until the new one is complete)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return safety_options(fn)


def _warn(message: str) -> None:
    from gemma2_convert.cli.errors import warn

    warn(message)


def _print_result(res: object, as_json: bool) -> None:
    import json

    from gemma2_convert.cli.console import human_bytes, out, table

    if as_json:
        d = {"output": str(res.output), "files": res.files, "bytes": res.nbytes, "config_from": res.config_from,
             "seconds": round(res.seconds, 3), "warnings": res.warnings,
             "verify": res.report.to_json() if res.report else None}
        click.echo(json.dumps(d, indent=2))
        return
    c = res.config
    out.print(table(f"wrote {res.output}", ["", ""], [
        ("files", ", ".join(res.files) if len(res.files) <= 4 else f"{len(res.files)} files"),
        ("size", human_bytes(res.nbytes)), ("config", res.config_from),
        ("layers / hidden / heads", f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads}q "
                                    f"{c.num_key_value_heads}kv × {c.head_dim}"),
        ("dtype", c.torch_dtype), ("time", f"{res.seconds:.1f}s")]))


def _print_report(rep: object, as_json: bool = False) -> None:
    import json

    from gemma2_convert.cli.console import out, table

    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2, default=str))
        return
    rows = [("tensors equal", f"{rep.tensors_equal} / {rep.tensors_total}"),
            ("tokens compared", rep.tokens), ("max |Δ logits|", f"{rep.max_abs_logits:.3g}"),
            ("mean KL(a‖b)", f"{rep.mean_kl:.3g}"), ("top-1 agreement", f"{rep.top1:.2%}"),
            ("perplexity a / b", f"{rep.ppl_a:.4g} / {rep.ppl_b:.4g}")]
    rows += [(f"differs: {d.name}", f"SQNR {d.sqnr_db:.1f} dB, max |Δ| {d.max_abs:.3g}") for d in rep.worst_tensors]
    rows.append(("result", "[green]PASS" if rep.passed else "[red]FAIL: " + "; ".join(rep.failures)))
    out.print(table(f"verify {rep.a} → {rep.b}", ["check", "value"], rows))


@cli.command("orig-to-hf")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SentencePiece tokenizer.model; default: the one next to CKPT.")
@shape_options
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard, e.g. 2GB.")
@convert_options
def orig_to_hf(ckpt: Path, out_dir: Path, tokenizer: Path | None, max_shard_size: str, dtype: str,
               verify_output: bool, force: bool, as_json: bool, allow_nonfinite: bool, quiet: bool,
               **shape: object) -> None:
    """Convert a gemma_pytorch checkpoint to a Hugging Face model directory, streaming, then verify it.

    CKPT is a model.ckpt, a directory holding one, or a sharded directory with
    pytorch_model.bin.index.json; the int8 variant is dequantized.

    \b
    Examples:
      gemma2-convert orig-to-hf gemma-2-2b/model.ckpt ./gemma-2-2b-hf
      gemma2-convert orig-to-hf ft.ckpt ./ft-hf --config config.json --dtype bfloat16
    """
    from gemma2_convert.pipeline.convert import orig_to_hf as run

    res = run(ckpt, out_dir, shape=_shape(shape), tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size,
              verify_output=verify_output, force=force, quiet=quiet or as_json, warn=_warn,
              on_report=None if as_json else _print_report, allow_nonfinite=allow_nonfinite)
    _print_result(res, as_json)


@cli.command("orig-to-safetensors")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--names", type=click.Choice(["hf", "orig"]), default="hf", show_default=True,
              help="Tensor names: transformers' (q/k/v split) or gemma_pytorch's (fused qkv_proj, embedder).")
@shape_options
@convert_options
def orig_to_safetensors(ckpt: Path, out_file: Path, names: str, dtype: str, verify_output: bool, force: bool,
                        as_json: bool, allow_nonfinite: bool, quiet: bool, **shape: object) -> None:
    """Convert a gemma_pytorch checkpoint to one self-describing .safetensors file (config in its metadata).

    \b
    Examples:
      gemma2-convert orig-to-safetensors model.ckpt gemma-2-2b.safetensors
      gemma2-convert orig-to-safetensors model.ckpt orig-names.safetensors --names orig
    """
    from gemma2_convert.pipeline.convert import orig_to_safetensors as run

    res = run(ckpt, out_file, names=names, shape=_shape(shape), dtype=dtype, verify_output=verify_output,
              force=force, quiet=quiet or as_json, warn=_warn, on_report=None if as_json else _print_report,
              allow_nonfinite=allow_nonfinite)
    _print_result(res, as_json)


@cli.command("verify")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--tolerance", type=click.Choice(["auto", "exact", "cast", "lossy"]), default="auto",
              show_default=True, help="exact: equal tensors and logits; cast: equal after casting, close logits; "
              "lossy: bounds on KL and top-1 only. auto: exact when the dtypes match, else cast.")
@click.option("--max-kl", type=float, default=0.05, show_default=True, help="lossy: largest mean KL(a‖b).")
@click.option("--min-top1", type=float, default=0.9, show_default=True, help="lossy: smallest top-1 agreement.")
@click.option("--tokens", type=int, default=64, show_default=True, help="Tokens per prompt.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="config.json for an input that stores none (gemma_pytorch of unpublished shape).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar (also off when stderr is not a terminal).")
def verify_cmd(a: Path, b: Path, tolerance: str, max_kl: float, min_top1: float, tokens: int,
               config_path: Path | None, as_json: bool, quiet: bool) -> None:
    """Compare two checkpoints (any format the reference reads): tensors, then logits on fixed prompts.

    Prints a table (--json: the same as JSON); exits 3, with one error line, when the comparison fails.

    \b
    Examples:
      gemma2-convert verify gemma-2-2b/model.ckpt ./gemma-2-2b-hf
      gemma2-convert verify ./gemma-2-2b-hf ./gemma-2-2b.safetensors --json
    """
    from gemma2_convert.pipeline.convert import verify_paths
    from gemma2_convert.formats.orig_config import ShapeOptions

    rep = verify_paths(a, b, tolerance=tolerance, max_kl=max_kl, min_top1=min_top1, n_tokens=tokens,
                       shape=ShapeOptions(config=config_path), quiet=quiet or as_json)
    _print_report(rep, as_json)
    if not rep.passed:
        from gemma2_convert.cli.errors import fail

        fail(f"{rep.b}: verification against {rep.a} failed: " + "; ".join(rep.failures), 3)


import gemma2_convert.cli.gguf as cli_gguf  # noqa: E402,F401  (registers to-gguf, orig-to-gguf, gguf-to-hf)
import gemma2_convert.cli.inspect as cli_inspect  # noqa: E402,F401  (registers inspect)


def main() -> None:
    quick_exit()
    cli(prog_name="gemma2-convert")


if __name__ == "__main__":
    # run the imported module's `cli`, on which the other command modules have registered
    from gemma2_convert.cli.main import main as _main

    _main()
