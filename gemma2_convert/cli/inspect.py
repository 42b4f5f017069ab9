"""``gemma2-convert inspect``: what a checkpoint is, and what the doctor finds wrong with it."""

from __future__ import annotations

from pathlib import Path

import click

from gemma2_convert.cli.console import RichProgress
from gemma2_convert.cli.errors import fail
from gemma2_convert.cli.render import print_inspection
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.inspect import inspect_path


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
@click.option("--scan", is_flag=True, help="Also read every tensor: NaN/Inf, values beyond the float16 range.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="config.json for an input that stores none (gemma_pytorch of unpublished shape).")
@click.option("--quiet", is_flag=True, help="No progress bar for --scan (also off when stderr is not a terminal).")
def inspect(path: Path, as_json: bool, scan: bool, config_path: Path | None, quiet: bool) -> None:
    """Show what a checkpoint is — format, variant, config, tensors (name, shape, type, bytes), metadata,
    provenance — and what the doctor finds wrong with it (stale GGUF keys, wrong special ids, a dropped
    untied head, misplaced +1 on norms, …). Exits 1, with one error line, when the doctor finds an error.

    \b
    Examples:
      gemma2-convert inspect ./gemma-2-2b-hf
      gemma2-convert inspect gemma-2-9b-it-Q4_K_M.gguf --json
      gemma2-convert inspect model.ckpt --config config.json --scan
    """
    with RichProgress(quiet or as_json or not scan) as progress:
        ins = inspect_path(path, options=ShapeOptions(config=config_path), scan=scan, progress=progress)
    print_inspection(ins, as_json)
    if ins.errors:
        first = ins.errors[0]
        more = f" (+{len(ins.errors) - 1} more, see the doctor section)" if len(ins.errors) > 1 else ""
        fail(f"{path}: {first.code}: {first.message}{more}", 1)
