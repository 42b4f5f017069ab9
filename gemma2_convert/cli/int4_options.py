"""gemma2-quantize's int4 options: ``--equalize``, ``--bpw``/``--target-size``, autoround's settings."""

from __future__ import annotations

from collections.abc import Callable

import click

from gemma2_convert.core.units import parse_size
from gemma2_convert.pipeline.autoround import FAST, INITS, AutoRoundSettings

DEFAULT = AutoRoundSettings()


def int4_options(fn: Callable) -> Callable:
    """``--equalize``, ``--bpw``, ``--target-size``, ``--autoround-steps/-batch/-tokens/-lr/-init/-fast``."""
    options = [
        click.option("--equalize", is_flag=True,
                     help="Fold activation-aware (AWQ) per-channel scales, measured on the calibration "
                          "text, into the pre-norms, up_proj and v_proj before quantizing: the float model is unchanged "
                          "(exact fold), the quantized one loses less. Works with every method and format."),
        click.option("--autoround-steps", type=click.IntRange(1), default=DEFAULT.steps, show_default=True,
                     help="--method autoround: signed-gradient steps per decoder layer (for 2B and up see "
                          "--autoround-fast: the default's steps take hours a layer there on 2 cores)."),
        click.option("--autoround-batch", type=click.IntRange(1), default=DEFAULT.batch, show_default=True,
                     help="--method autoround: calibration sequences per step."),
        click.option("--autoround-tokens", type=click.IntRange(1), default=DEFAULT.tokens, show_default=True,
                     help="--method autoround: leading tokens of each sequence a step uses."),
        click.option("--bpw", type=click.FloatRange(min=2, max=8.5), default=None,
                     help="--format gguf: bits per weight over the matrices; each tensor's GGUF type is "
                          "chosen by its measured sensitivity on the calibration text (listed in the report "
                          "and the file's metadata)."),
        click.option("--target-size", default=None,
                     help="--format gguf: like --bpw, for a file of at most this size (5GB, 1.2G, bytes; "
                          "the header, tokenizer and norms as planned are subtracted, the rest is filled)."),
        click.option("--autoround-lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="--method autoround: step size (default 1 / steps, decayed linearly)."),
        click.option("--autoround-init", type=click.Choice(INITS), default=DEFAULT.init, show_default=True,
                     help="--method autoround: start from GPTQ's codes and scales (then refined), or "
                          "from round-to-nearest on mse's scales (SignRound's start)."),
        click.option("--autoround-fast", is_flag=True,
                     help=f"--method autoround: the faster setting, for 2B and up (GPTQ's start on "
                          f"{FAST.tokens}-token prefixes, {FAST.steps} bf16 steps of {FAST.batch} sequences "
                          f"judged on {FAST.judge}, the target on the quantized stream); the other "
                          "--autoround-* options are then ignored."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def autoround_settings(steps: int, batch: int, tokens: int, lr: float | None,
                       init: str = DEFAULT.init, fast: bool = False) -> AutoRoundSettings:
    """The settings the options ask for (``FAST`` with ``--autoround-fast``)."""
    return FAST if fast else AutoRoundSettings(steps=steps, lr=lr, batch=batch, tokens=tokens, init=init)


def target_bytes(value: str | None) -> int | None:
    """``--target-size``: bytes, or None."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--target-size") from None
