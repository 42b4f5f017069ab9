"""Quantized → quantized: a compressed-tensors int4 sym g32 model to GGUF Q4_0 (codes moved, not re-quantized),
against the plain ``to-gguf --type q8_0`` of the same model in bf16, each with its peak anonymous memory (≤ 2 GB).

The quantized source is synthetic and written directly (no quantizer run): random int4 codes, bf16 scales (fp16
values, so every block moves exactly), the embedding and norms in bf16, in the pack-quantized layout our
``gemma2-quantize --format hf`` writes. The anchor's source is a bf16 HF directory of the same shapes. Both
commands run with ``--no-verify`` (the conversion itself is timed); a third case runs the transcode verified.
The other directions, timed alike: GGUF Q4_0 → compressed-tensors (``--quantized keep``) and MLX int4 g32 →
GGUF Q4_1, their sources made once from the compressed-tensors one (untimed); and a K-quant source: the bf16
model's ``to-gguf --type q4_k_m`` (llama-quantize's bytes; made once, untimed) → MLX (Q4_K → 4-bit g32 with
float32 scales and biases, the Q6_K tensors as float32).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from bench import harness, report, synth
from bench.harness import CONVERT, Case

MARK = "transcode"
MEMORY_GOAL_GB = 2.0


def write_ct_source(out: Path, size: str, seed: int = 0) -> int:
    """A pack-quantized int4 sym g32 directory of the preset's shapes; returns its parameter count."""
    from gemma2_convert.core.lazy import LazyTensor
    from gemma2_convert.formats.hf import write_hf_dir
    from gemma2_convert.formats.synthetic import random_tensors
    from gemma2_convert.formats.tokenizer.tiny import make_tiny_spm
    from quant.compressed_tensors import packed_layout, quantization_config
    from quant.policy import is_decoder_linear
    from quant.spec import QuantSpec

    cfg, spec = synth.preset(size), QuantSpec(4, 32, True, "rtn")
    out.mkdir(parents=True)
    items: list[tuple[str, LazyTensor]] = []
    for name, t in random_tensors(cfg, seed, torch.bfloat16).items():
        if not is_decoder_linear(name):
            items.append((name, t))
            continue
        prefix = name.removesuffix(".weight")
        for part, (shape, dtype) in packed_layout(prefix, t.shape, spec, torch.bfloat16).items():
            items.append((part, LazyTensor(shape, dtype, lambda p=part, s=t.shape, sh=shape: _part(p, s, sh))))
    modules = {n.removesuffix(".weight"): spec for n, _ in random_tensors(cfg).items() if is_decoder_linear(n)}
    tok = make_tiny_spm(out.parent / "ct.tokenizer.model", min(512, cfg.vocab_size))
    write_hf_dir(out, cfg, items, tokenizer=tok, extra_config={"quantization_config": quantization_config(modules)})
    return synth.n_params(cfg)


def _part(part: str, shape: tuple[int, int], stored: tuple[int, ...]) -> torch.Tensor:
    from quant.pack import pack_int32

    g = torch.Generator().manual_seed(zlib.crc32(part.encode()))
    if part.endswith("weight_shape"):
        return torch.tensor(list(shape), dtype=torch.int64)
    if part.endswith("weight_scale"):
        return (torch.rand(stored, generator=g) * 0.01 + 0.001).to(torch.float16).to(torch.bfloat16)
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    return pack_int32(codes, 4, packed_dim=1)


def derived_sources(ct: Path, work: Path, threads: int, fold: bool) -> tuple[Path, Path]:
    """A Q4_0 GGUF and an MLX int4 g32 directory holding ``ct``'s codes (for the other directions' cases)."""
    q4, mlx, re = work / "source-q4_0.gguf", work / "source-mlx-int4-g32", ["--requantize"] if fold else []
    for out, to in ((q4, ["--to", "gguf", "--type", "q4_0", *re]), (mlx, ["--to", "mlx"])):
        harness.measure(Case([*CONVERT, "convert", str(ct), str(out), *to, "--no-verify", "--threads", str(threads)],
                             out))
    return q4, mlx


def cases(ct: Path, hf: Path, work: Path, threads: int, fold: bool,
          others: tuple[Path, Path] | None = None) -> dict[str, Case]:
    """``fold``: the preset's query scale is folded into attn_q (tiny, 27B), whose groups then need
    ``--requantize`` (a folded scale is no longer an fp16 value)."""
    q4, re = work / "transcoded-q4_0.gguf", ["--requantize"] if fold else []
    return {
        "convert CT int4 g32 → GGUF Q4_0 (transcode, --no-verify)": Case(
            [*CONVERT, "convert", str(ct), str(q4), "--to", "gguf", "--type", "q4_0", "--no-verify", "--json",
             "--threads", str(threads), *re], q4),
        "to-gguf bf16 → Q8_0 (quantize, --no-verify)": Case(
            [*CONVERT, "to-gguf", str(hf), str(work / "q8_0.gguf"), "--type", "q8_0", "--no-verify", "--json",
             "--threads", str(threads)], work / "q8_0.gguf"),
        "convert CT int4 g32 → GGUF Q4_0 (transcode, verified)": Case(
            [*CONVERT, "convert", str(ct), str(q4), "--to", "gguf", "--type", "q4_0", "--json",
             "--threads", str(threads), *re], q4),
    } | (_other_directions(*others, work, threads, re) if others else {})


def kquant_source(hf: Path, work: Path, threads: int) -> Path:
    """llama-quantize's Q4_K_M of ``hf`` (our ``to-gguf --type q4_k_m``, byte for byte), made once (untimed)."""
    out = work / "source-q4_k_m.gguf"
    harness.measure(Case([*CONVERT, "to-gguf", str(hf), str(out), "--type", "q4_k_m", "--no-verify",
                          "--threads", str(threads)], out))
    return out


def kquant_case(q4km: Path, work: Path, threads: int) -> dict[str, Case]:
    mlx = work / "transcoded-mlx-from-q4_k_m"
    return {"convert GGUF Q4_K_M → MLX (K-quant codes, --no-verify)": Case(
        [*CONVERT, "convert", str(q4km), str(mlx), "--to", "mlx", "--no-verify", "--json", "--threads",
         str(threads)], mlx)}


def _other_directions(q4: Path, mlx: Path, work: Path, threads: int, re: list[str]) -> dict[str, Case]:
    ct, q41 = work / "transcoded-ct", work / "transcoded-q4_1.gguf"
    return {
        "convert GGUF Q4_0 → compressed-tensors (transcode, --no-verify)": Case(
            [*CONVERT, "convert", str(q4), str(ct), "--to", "hf", "--quantized", "keep", "--no-verify", "--json",
             "--threads", str(threads)], ct),
        "convert MLX int4 g32 → GGUF Q4_1 (transcode, --no-verify)": Case(
            [*CONVERT, "convert", str(mlx), str(q41), "--to", "gguf", "--type", "q4_1", "--no-verify", "--json",
             "--threads", str(threads), *re], q41),
    }


def run(size: str, runs: int, work: Path, threads: int, machine: dict, quick: bool, shared: Path) -> str:
    ct = work / f"gemma-2-{size}-shaped-int4-g32"
    params = write_ct_source(ct, size)
    hf, _ = synth.shared_hf_source(shared, size)
    from gemma2_convert.formats.gguf.names import query_fold_ratio

    fold = query_fold_ratio(synth.preset(size)) != 1.0
    chosen = cases(ct, hf, work, threads, fold, derived_sources(ct, work, threads, fold))
    chosen |= kquant_case(kquant_source(hf, work, threads), work, threads)
    if quick:
        chosen.pop(next(k for k in chosen if "verified" in k))
    res = harness.interleaved(chosen, runs)
    data = {"size": size, "params": params, "source_bytes": harness.tree_bytes(ct), "machine": machine,
            "cases": {k: harness.summary(v) for k, v in res.items()},
            "details": {k: v[-1].json().get("details", {}).get("transcode", {}) for k, v in res.items()}}
    return render(data)


def render(data: dict) -> str:
    lines = [f"## Quantized → quantized: {data['size'].upper()}-shaped int4 codes moved between layouts", "",
             report.run_line(f"python -m bench transcode --size {data['size']}", data["machine"]), ""]
    anchor = next((v["exit_s"] for k, v in data["cases"].items() if "Q8_0" in k), None)
    rows = [[k, f"{v['exit_s']:.1f}", report.ratio(v["exit_s"], anchor), report.gb(v["peak_anon_gb"]),
             "yes" if v["peak_anon_gb"] <= MEMORY_GOAL_GB else "**no**"] for k, v in data["cases"].items()]
    lines += [f"{data['params'] / 1e9:.2f} B params; quantized source {data['source_bytes'] / 1e9:.2f} GB.", "",
              *report.table(["command", "wall, s", "vs to-gguf Q8_0", "peak RssAnon", f"≤ {MEMORY_GOAL_GB:g} GB"],
                            rows), "",
              ("Median of the runs (interleaved). The transcodes re-quantize nothing: each block is the source "
               "group's codes and its (fp16-exact) scale; the Q4_0 and MLX sources hold the compressed-tensors "
               "one's codes; the Q4_K_M one is the bf16 model's, its Q4_K sub-blocks moved as MLX groups of 32.")]
    return report.section(MARK, lines, data)
