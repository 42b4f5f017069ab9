"""``inspect``: a thin click command over ``gemma2_convert.pipeline.inspect``, and its rich rendering."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from gemma2_convert.cli.main import cli

CONFIG_ROWS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
               "sliding_window", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype")
LEVEL_STYLE = {"error": "[bold red]error[/]", "warning": "[yellow]warning[/]", "info": "[cyan]info[/]"}


def _flat(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _flat(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v))
    return rows


def render(ins: object, console: Console) -> None:
    """The inspection as rich tables: overview, config, tensors, metadata, provenance, doctor."""
    from rich.markup import escape

    from gemma2_convert.cli.console import human_bytes, table

    def esc(rows: list) -> list:
        return [tuple(escape(str(x)) for x in r) for r in rows]

    console.print(table("inspect", ["", ""], esc([
        ("path", ins.path), ("format", ins.format), ("variant", ins.variant), ("tensors", len(ins.tensors)),
        ("size", human_bytes(ins.total_bytes))])))
    if ins.config:
        layer_types = ins.config.get("layer_types") or []
        rows = [(k, ins.config[k]) for k in CONFIG_ROWS if k in ins.config]
        if layer_types:
            rows.append(("layer_types", f"{sum(t == 'sliding_attention' for t in layer_types)} sliding, "
                                        f"{sum(t == 'full_attention' for t in layer_types)} full"))
        console.print(table("config", ["key", "value"], esc(rows)))
    console.print(table("tensors", ["name", "shape", "type", "bytes"], esc(
        [(r.name, list(r.shape), r.type, f"{r.nbytes:,}") for r in ins.tensors])))
    if ins.metadata:
        console.print(table("metadata", ["key", "value"], esc(_flat(ins.metadata))))
    console.print(table("provenance", ["key", "value"], esc(_flat(ins.provenance)))
                  if ins.provenance else "[dim]provenance: none recorded[/]")
    if ins.findings:
        console.print(table("doctor", ["level", "check", "finding"],
                            [(LEVEL_STYLE[f.level], escape(f.code), escape(f.message)) for f in ins.findings]))
    else:
        console.print("[green]doctor: no known problem found[/]")


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
@click.option("--scan", is_flag=True, help="Also read every tensor: NaN/Inf, values beyond the float16 range.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="config.json for an input that stores none (gemma_pytorch of unpublished shape).")
@click.option("--quiet", is_flag=True, help="No progress bar for --scan (also off when stderr is not a terminal).")
def inspect_cmd(path: Path, as_json: bool, scan: bool, config_path: Path | None, quiet: bool) -> None:
    """Show what a checkpoint is — format, variant, config, tensors (name, shape, type, bytes), metadata,
    provenance — and what the doctor finds wrong with it (stale GGUF keys, wrong special ids, a dropped
    untied head, misplaced +1 on norms, …). Exits 1, with one error line, when the doctor finds an error.

    \b
    Examples:
      gemma2-convert inspect ./gemma-2-2b-hf
      gemma2-convert inspect gemma-2-9b-it-Q4_K_M.gguf --json
      gemma2-convert inspect model.ckpt --config config.json --scan
    """
    from gemma2_convert.cli.errors import fail
    from gemma2_convert.cli.console import byte_progress, out
    from gemma2_convert.formats.orig_config import ShapeOptions
    from gemma2_convert.pipeline.inspect import inspect_path

    with byte_progress(None, "scanning", quiet or as_json or not scan) as bar:
        ins = inspect_path(path, options=ShapeOptions(config=config_path), scan=scan, on_tensor=bar.advance)
    if as_json:
        click.echo(json.dumps(ins.to_json(), indent=2, ensure_ascii=False))
    else:
        render(ins, out)
    if ins.errors:
        first = ins.errors[0]
        more = f" (+{len(ins.errors) - 1} more, see the doctor section)" if len(ins.errors) > 1 else ""
        fail(f"{path}: {first.code}: {first.message}{more}", 1)
