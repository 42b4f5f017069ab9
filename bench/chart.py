"""docs/benchmarks.png from the data of docs/BENCHMARKS.md: time and peak RssAnon per tool.

matplotlib is optional (``pip install -e ".[bench]"``); without it the chart is skipped with a message.
"""

from __future__ import annotations

from pathlib import Path

from bench.report import read_data


def _bars(data: dict) -> list[tuple[str, str, list[tuple[str, float, float]]]]:
    """(panel title, time unit, [(tool, time, peak GB)]) for each section that has per-tool rows."""
    panels = []
    for mark, title in (("orig-to-hf", "orig→HF"), ("keras", "Keras→HF"), ("gguf", "HF→GGUF")):
        d = data.get(mark)
        if d:
            rows = [(k, v["durable_s"], v["peak_anon_gb"]) for k, v in d["cases"].items() if not k.startswith("start")]
            panels.append((f"{title} ({d['size'].upper()}, {d['bytes'] / 1e9:.1f} GB)", "wall to durable, s", rows))
    d = data.get("quant")
    if d:
        rows = [(k, v["exit_s"], v["peak_anon_gb"]) for k, v in d["cases"].items()]
        panels.append((f"quantization, whole file ({d['params'] / 1e6:.0f} M params)", "wall, s", rows))
    d = data.get("forward")
    if d:
        rows = [(f"{k.split('/')[0]} {k.split('/')[1]} decode", 1.0 / v["decode_tok_s"], v["peak_anon_gb"])
                for k, v in d["results"].items()]
        panels.append((f"forward ({d['size'].upper()}), ref = reference, hf = transformers", "s per decoded token",
                       rows))
    return panels


def draw(doc: Path, png: Path) -> str:
    """Write the chart; return a one-line message (what was written, or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
    data = read_data(doc)
    panels = _bars(data)
    scale = data.get("scale")
    n = len(panels) + (1 if scale else 0)
    if n == 0:
        return "chart skipped: no benchmark data in " + str(doc)
    fig, axes = plt.subplots(n, 2, figsize=(13, 2.2 + 1.9 * n), squeeze=False)
    for (title, unit, rows), (ax_t, ax_m) in zip(panels, axes):
        names = [r[0] for r in rows][::-1]
        ax_t.barh(names, [r[1] for r in rows][::-1], color="#4C72B0")
        ax_t.set_title(title, fontsize=9, loc="left")
        ax_t.set_xlabel(unit, fontsize=8)
        ax_m.barh(names, [r[2] for r in rows][::-1], color="#DD8452")
        ax_m.set_xlabel("peak RssAnon, GB", fontsize=8)
        ax_m.set_yticklabels([])
        for ax in (ax_t, ax_m):
            ax.tick_params(labelsize=7)
            ax.bar_label(ax.containers[0], fmt="%.3g", fontsize=7, padding=2)
            ax.margins(x=0.15)
    if scale:
        _scale_panel(axes[-1], scale)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return f"chart written to {png}"


def _scale_panel(axes, scale: dict) -> None:
    ax_t, ax_m = axes
    rows = [r for r in scale["rows"] if "skipped" not in r]
    params = [r["params"] / 1e9 for r in rows]
    for name, style in (("orig-to-hf --no-verify", "o-"), ("orig-to-hf (verify, 64 tokens)", "s-"),
                        ("verify --tokens 16", "^-")):
        pts = [(p, r[name]) for p, r in zip(params, rows) if name in r]
        if pts:
            ax_t.plot([p for p, _ in pts], [s["durable_s"] for _, s in pts], style, label=name)
            ax_m.plot([p for p, _ in pts], [s["peak_anon_gb"] for _, s in pts], style, label=name)
    ax_t.set_title("scale: time against model size", fontsize=9, loc="left")
    ax_t.set_xlabel("parameters, B", fontsize=8)
    ax_t.set_ylabel("s", fontsize=8)
    ax_m.set_title("scale: peak RssAnon against model size", fontsize=9, loc="left")
    ax_m.set_xlabel("parameters, B", fontsize=8)
    ax_m.set_ylabel("GB", fontsize=8)
    ax_m.set_ylim(bottom=0)
    for ax in (ax_t, ax_m):
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
