"""The error family every reader, writer and command raises for bad input.

A leaf module (no project imports), so every layer may raise these. The CLI prints
``str(err)`` on one line of stderr and exits non-zero; a traceback only with ``--debug``.

Messages name the file, the tensor or key, expected vs actual, and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class ConversionError(Exception):
    """Base class: anything wrong with the user's input, options or environment."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(ConversionError):
    """A file is not what it claims to be: bad magic, lying header, truncated data."""


class UnknownFormatError(FormatError):
    """No reader recognises the input."""


class ConfigError(ConversionError):
    """A model configuration is missing a key, or contradicts the tensors."""


class TensorMismatchError(ConversionError):
    """Missing, unexpected or wrongly shaped tensors."""


class OutputExistsError(ConversionError):
    """The output path exists and ``--force`` was not given."""


class VerificationError(ConversionError):
    """A written artifact does not reproduce its source within tolerance."""

    exit_code = 3


class UnsupportedError(ConversionError):
    """A valid request this version cannot carry out (e.g. an unsupported quant type)."""


class NonFiniteError(ConversionError):
    """A weight holds NaN/Inf, or would overflow the output dtype (``--allow-nonfinite`` writes it anyway)."""


class DiskSpaceError(ConversionError):
    """Not enough free space for the output, found before writing or when a write failed."""

    exit_code = 28


def name_list(names: Iterable[str], limit: int = 20) -> str:
    """Sorted, comma-separated names, truncated after ``limit`` with a count of the rest."""
    items = sorted(names)
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")


def check_names(
    expected: Iterable[str], actual: Iterable[str], where: str | Path | None = None, what: str = "tensors"
) -> None:
    """Raise one TensorMismatchError listing all missing and all unexpected names, sorted."""
    exp, act = set(expected), set(actual)
    missing, unexpected = exp - act, act - exp
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} {what}: {name_list(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} {what}: {name_list(unexpected)}")
    raise TensorMismatchError(
        "; ".join(parts) + ". Is this a Gemma 2 checkpoint of the expected variant?", where
    )
