"""``gemma2-convert lora-to-gguf ADAPTER_DIR OUT.gguf --base BASE``: a PEFT LoRA as llama.cpp's LoRA GGUF."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from gemma2_convert.cli.options import shape_options
from gemma2_convert.formats.orig_config import ShapeOptions
from gemma2_convert.pipeline.adapters import lora_to_gguf as run


@click.command("lora-to-gguf")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base", type=click.Path(exists=True, path_type=Path), required=True,
              help="The model the adapter runs on (any input this tool reads; a GGUF made by this tool or "
                   "by llama.cpp): its shapes are checked, and its query-scale fold is applied to attn_q's "
                   "lora_b.")
@shape_options
@click.option("--force", is_flag=True,
              help="Replace an existing output (kept until the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def lora_to_gguf(adapter: Path, out: Path, base: Path, shape: ShapeOptions, force: bool, as_json: bool,
                 quiet: bool) -> None:
    """Write the PEFT LoRA adapter ADAPTER as a llama.cpp LoRA GGUF (llama-cli --lora OUT.gguf) for BASE.

    DoRA, modules_to_save and embedding or output-head adapters cannot be expressed as a LoRA GGUF: merge
    those
    with `convert --adapter` instead.

    \b
    Examples:
      gemma2-convert lora-to-gguf ./my-lora my-lora.gguf --base gemma-2-2b-f16.gguf
      gemma2-convert lora-to-gguf ./my-lora my-lora.gguf --base ./gemma-2-2b-hf --json
    """
    res = run(adapter, out, base, force=force, shape=shape)
    if as_json:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(res).items()}
        click.echo(json.dumps(data, indent=2))
    elif not quiet:
        fold = "" if res.query_fold == 1 else f", attn_q lora_b × {res.query_fold:.6g} (the base's fold)"
        click.echo(f"wrote {res.output} ({res.tensors} tensors, {res.nbytes:,} bytes, alpha {res.alpha:g}"
                   f"{fold})")
