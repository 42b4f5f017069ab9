"""``gemma2-convert demo``: the whole product on a tiny random model, each step verified, as one table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gemma2_convert.cli.render import print_demo, print_demo_step
from gemma2_convert.pipeline.demo import run_demo


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's files here (must be empty or absent). Default: a temporary directory, "
                   "deleted after.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random tiny model.")
@click.option("--quiet", is_flag=True, help="Print only the final table, not each step as it finishes.")
def demo(workdir: Path | None, seed: int, quiet: bool) -> None:
    """Build a tiny Gemma 2, convert it to every layout, quantize it, verify each step, print a table.

    \b
    Example:
      gemma2-convert demo --workdir ./demo-out
    """
    rows = run_demo(workdir, seed, on_row=None if quiet else print_demo_step)
    print_demo(rows)
    if not all(r.ok for r in rows):
        sys.exit(3)
