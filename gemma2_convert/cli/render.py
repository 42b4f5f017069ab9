"""What the commands print: each result as rich tables on stdout, or with ``--json`` the same as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from gemma2_convert.cli.console import out, table
from gemma2_convert.core.units import human_bytes

if TYPE_CHECKING:
    from gemma2_convert.pipeline.convert import ConvertResult
    from gemma2_convert.pipeline.demo import DemoRow
    from gemma2_convert.pipeline.inspect import Inspection
    from gemma2_convert.pipeline.quantize import QuantizeResult
    from gemma2_convert.pipeline.verify import VerifyReport
    from reference.config import Gemma2Config

MAX_CHOICE_ROWS = 12
"""GGUF tensors of a non-default type listed in the table (all of them in ``--json``)."""
CONFIG_ROWS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
               "sliding_window", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype")
"""The config keys ``inspect`` shows, in this order."""
LEVEL_STYLE = {"error": "[bold red]error[/]", "warning": "[yellow]warning[/]", "info": "[cyan]info[/]"}


def shape_row(c: Gemma2Config) -> tuple[str, str]:
    return ("layers / hidden / heads", (f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads}q "
                                        f"{c.num_key_value_heads}kv × {c.head_dim}"))


def transcode_rows(details: dict) -> list[tuple[str, str]]:
    """A quantized source kept quantized: how many tensors, and the groups the output could not hold exactly."""
    tr = details.get("transcode")
    if not tr:
        return []
    how = "re-quantized" if tr.get("requantized") else "exact"
    text = f"{tr.get('transcoded', 0)} tensors, {tr.get('inexact_groups', 0)} of {tr.get('groups', 0)} groups"
    return [("kept quantized", f"{text} not exact ({how})")]


def print_conversion(res: ConvertResult, as_json: bool) -> None:
    """A conversion to HF or safetensors: files, size, config, time."""
    if as_json:
        click.echo(json.dumps({
            "output": str(res.output), "files": res.files, "bytes": res.nbytes, "config_from": res.config_from,
            "seconds": round(res.seconds, 3), "warnings": res.warnings, "details": _plain(res.details),
            "verify": res.report.to_json() if res.report else None}, indent=2))
        return
    out.print(table(f"wrote {res.output}", ["", ""], [
        ("files", ", ".join(res.files) if len(res.files) <= 4 else f"{len(res.files)} files"),
        ("size", human_bytes(res.nbytes)), ("config", res.config_from), shape_row(res.config),
        ("dtype", res.config.torch_dtype), *transcode_rows(res.details), ("time", f"{res.seconds:.1f}s")]))


def _plain(details: dict) -> dict:
    """The JSON part of a result's details: the transcode record (quantized source kept quantized)."""
    return {k: v for k, v in details.items() if k == "transcode"}


def print_gguf(res: ConvertResult, as_json: bool) -> None:
    """A GGUF written: size, type, query-scale fold, the tensors of a non-default type and why."""
    choices = res.details["choices"]
    fold = res.details["query_fold"]
    if as_json:
        click.echo(json.dumps({
            "output": str(res.output), "files": res.files, "type": res.details["type"], "bytes": res.nbytes,
            "query_fold": fold,
            "special_types": {c.name: f"{c.qtype} ({c.reason})" for c in choices},
            "seconds": round(res.seconds, 3), "warnings": res.warnings, "details": _plain(res.details),
            "verify": res.report.to_json() if res.report else None}, indent=2))
        return
    rows = [("size", human_bytes(res.nbytes)), ("type", res.details["type"]), shape_row(res.config),
            *([("split", f"{len(res.files)} parts: {res.files[0]} …")] if len(res.files) > 1 else []),
            ("query scale folded into attn_q", "no" if fold == 1 else f"× {fold:.6g}"),
            *transcode_rows(res.details), ("time", f"{res.seconds:.1f}s")]
    rows += [(c.name, f"{c.qtype} ({c.reason})") for c in choices[:MAX_CHOICE_ROWS]]
    if len(choices) > MAX_CHOICE_ROWS:
        rows.append(("…", f"{len(choices) - MAX_CHOICE_ROWS} more tensors with a non-default type"))
    out.print(table(f"wrote {res.output}", ["", ""], rows))


def print_report(rep: VerifyReport, as_json: bool = False) -> None:
    """A verification: tensors equal, logits compared, the worst tensors, the verdict."""
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2, default=str))
        return
    rows = [("tensors equal", f"{rep.tensors_equal} / {rep.tensors_total}"),
            ("tokens compared", rep.tokens), ("max |Δ logits|", f"{rep.max_abs_logits:.3g}"),
            ("mean KL(a‖b)", f"{rep.mean_kl:.3g}"), ("top-1 agreement", f"{rep.top1:.2%}"),
            ("perplexity a / b", f"{rep.ppl_a:.4g} / {rep.ppl_b:.4g}")]
    if rep.text is not None:
        t = rep.text
        rows += [("text: tokens compared", int(t["tokens"])), ("text: max |Δ logits|", f"{t['max_abs_logits']:.3g}"),
                 ("text: mean KL(a‖b)", f"{t['mean_kl']:.3g}"), ("text: top-1 agreement", f"{t['top1']:.2%}"),
                 ("text: perplexity a / b", f"{t['ppl_a']:.4g} / {t['ppl_b']:.4g}")]
    rows += [(f"differs: {d.name}", f"SQNR {d.sqnr_db:.1f} dB, max |Δ| {d.max_abs:.3g}") for d in rep.worst_tensors]
    rows += [("bounds", rep.bounds)] if rep.bounds else []
    rows += [("proven", line) for line in rep.proof]
    rows.append(("result", "[green]PASS" if rep.passed else "[red]FAIL: " + "; ".join(rep.failures)))
    rows += [("likely cause", line) for line in rep.likely_causes]
    out.print(table(f"verify {rep.a} → {rep.b}", ["check", "value"], rows))


def print_quantization(res: QuantizeResult, as_json: bool) -> None:
    """gemma2-quantize: the worst tensors by SQNR, sizes, and the quality against the source."""
    stats = sorted(res.stats, key=lambda s: s.sqnr_db)
    if as_json:
        click.echo(json.dumps({"output": str(res.out), "format": res.format, "quantized": res.quantized,
                               "kept": res.kept, "source_bytes": res.source_bytes, "output_bytes": res.output_bytes,
                               "quality": res.quality, "tensors": [s.__dict__ for s in stats]}, indent=2))
        return
    out.print(table(f"gemma2-quantize → {res.out}", ["tensor", "spec", "SQNR dB", "rel. RMSE"],
                    [(s.name, s.spec, f"{s.sqnr_db:.2f}", f"{s.rel_rmse:.4f}") for s in stats[:8]]
                    + ([("…", f"{len(stats) - 8} more", "", "")] if len(stats) > 8 else [])))
    rows = [("tensors quantized / kept", f"{res.quantized} / {res.kept}"),
            ("size", f"{human_bytes(res.source_bytes)} → {human_bytes(res.output_bytes)}")]
    q = res.quality
    if q:
        rows += [("mean KL (source ‖ quantized)", f"{q['mean_kl']:.5f}"), ("top-1 agreement", f"{q['top1']:.2%}"),
                 ("perplexity source / quantized", f"{q['ppl_a']:.3f} / {q['ppl_b']:.3f}"),
                 ("eval tokens", q["tokens"]),
                 ("reference weight memory", (f"{human_bytes(q['weights_bytes_packed'])} packed vs "
                                              f"{human_bytes(q['weights_bytes_dense_fp32'])} dense fp32"))]
    out.print(table("quality", ["", ""], rows))


def flat_rows(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    """A nested dict as (dotted key, value) rows; non-string values as JSON."""
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += flat_rows(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v))
    return rows


def escaped(rows: Sequence[Sequence[Any]]) -> list[tuple[str, ...]]:
    """Cells as plain text: a value like ``[flax]`` is not rich markup."""
    return [tuple(escape(str(x)) for x in r) for r in rows]


def render_inspection(ins: Inspection, console: Console) -> None:
    """The inspection as rich tables: overview, config, tensors, metadata, provenance, doctor."""
    console.print(table("inspect", ["", ""], escaped([
        ("path", ins.path), ("format", ins.format), ("variant", ins.variant), ("tensors", len(ins.tensors)),
        ("size", human_bytes(ins.total_bytes))])))
    if ins.config:
        layer_types = ins.config.get("layer_types") or []
        rows = [(k, ins.config[k]) for k in CONFIG_ROWS if k in ins.config]
        if layer_types:
            rows.append(("layer_types", (f"{sum(t == 'sliding_attention' for t in layer_types)} sliding, "
                                         f"{sum(t == 'full_attention' for t in layer_types)} full")))
        console.print(table("config", ["key", "value"], escaped(rows)))
    if ins.parts:
        console.print(table(f"split into {len(ins.parts)} parts", ["file", "tensors", "bytes", "problem"], escaped(
            [(p.name, p.tensors, f"{p.nbytes:,}", p.problem or "ok") for p in ins.parts])))
    console.print(table("tensors", ["name", "shape", "type", "bytes"], escaped(
        [(r.name, list(r.shape), r.type, f"{r.nbytes:,}") for r in ins.tensors])))
    if ins.metadata:
        console.print(table("metadata", ["key", "value"], escaped(flat_rows(ins.metadata))))
    console.print(table("provenance", ["key", "value"], escaped(flat_rows(ins.provenance)))
                  if ins.provenance else "[dim]provenance: none recorded[/]")
    if ins.findings:
        console.print(table("doctor", ["level", "check", "finding"],
                            [(LEVEL_STYLE[f.level], escape(f.code), escape(f.message)) for f in ins.findings]))
    else:
        console.print("[green]doctor: no known problem found[/]")


def print_inspection(ins: Inspection, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(ins.to_json(), indent=2, ensure_ascii=False))
    else:
        render_inspection(ins, out)


def print_demo_step(row: DemoRow) -> None:
    """One line as a demo step finishes: ✓ passed, – skipped, ✗ failed."""
    out.print(f"[dim]{'–' if row.skipped else '✓'} {row.step}[/]" if row.ok else f"[red]✗ {row.step}")


def print_demo(rows: list[DemoRow]) -> None:
    """The demo's table: one row per step, its artifact, size, check and verdict."""
    out.print(table("gemma2-convert demo", ["step", "artifact", "size", "check", "result", "time"], [
        (r.step, r.artifact, human_bytes(r.size) if r.size else "", escape(r.check),  # "[flax]" is not markup
         "[yellow]SKIP" if r.skipped else "[green]PASS" if r.ok else "[red]FAIL", f"{r.seconds:.2f}s") for r in rows]))
