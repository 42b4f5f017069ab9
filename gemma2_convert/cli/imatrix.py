"""``gemma2-convert imatrix``: llama.cpp's importance matrix of a checkpoint over a text."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress, out, table
from gemma2_convert.cli.options import force_option, json_option
from gemma2_convert.pipeline.imatrix import ImatrixResult, make_imatrix


def print_imatrix(res: ImatrixResult, as_json: bool) -> None:
    facts = {"output": str(res.path), "format": res.format,
             "entries": res.entries, "chunks": res.chunks, "tokens": res.tokens,
             "seconds": round(res.seconds, 3), "tokens_per_s": round(res.tokens_per_s, 1)}
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    out.print(table(f"wrote {res.path}", ["", ""], [
        ("format", res.format), ("entries", str(res.entries)),
        ("chunks × tokens", f"{res.chunks} × {res.tokens // max(res.chunks, 1)}"),
        ("time", f"{res.seconds:.1f}s ({res.tokens_per_s:.0f} tokens/s)")]))


@click.command("imatrix")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="UTF-8 text to run the model over (llama-imatrix's -f).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The imatrix file to write (imatrix.gguf, or a .dat with --format dat).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per chunk, each run as its own sequence starting with <bos> (llama-imatrix's -c).")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Use at most N chunks of the text (default: all of it).")
@click.option("--format", "fmt", type=click.Choice(["gguf", "dat"]), default="gguf", show_default=True,
              help="gguf: llama.cpp's current imatrix GGUF; dat: the legacy .dat older tools read.")
@force_option
@json_option
@click.option("--quiet", is_flag=True, help="No progress bar (also off when stderr is not a terminal).")
def imatrix(src: Path, calibration: Path, output: Path, chunk_size: int, chunks: int | None, fmt: str,
            force: bool, as_json: bool, quiet: bool) -> None:
    """Compute llama.cpp's importance matrix of SRC (any format this tool reads) over a text, as
    `llama-imatrix -m MODEL.gguf -f FILE -c CHUNK_SIZE` would, streaming one layer's weights at a time.
    Give it to `to-gguf --imatrix` or `llama-quantize --imatrix`.

    \b
    Examples:
      gemma2-convert imatrix ./gemma-2-2b-it --calibration calibration.txt -o imatrix.gguf
      gemma2-convert imatrix gemma-2-9b.gguf --calibration wiki.txt -o imatrix.dat --format dat --chunks 100
    """
    with RichProgress(quiet or as_json) as progress:
        res = make_imatrix(src, calibration, output, chunk_size=chunk_size, chunks=chunks,
                           legacy=fmt == "dat", force=force, progress=progress)
    print_imatrix(res, as_json)
