"""The README's format tables are the registries' (``gemma2-convert formats --markdown``)."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from gemma2_convert.cli.main import cli
from gemma2_convert.formats import READERS, WRITERS
from gemma2_convert.formats.gguf.mix import GGUF_TYPES
from gemma2_convert.pipeline import catalog

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tables_are_the_registries():
    block = re.search(r"<!-- formats -->\n(.*?)<!-- /formats -->", README.read_text(encoding="utf-8"), re.S)
    assert block is not None, "README.md has no <!-- formats --> block"
    assert block.group(1) == catalog.markdown(), "regenerate it: gemma2-convert formats --markdown"


def test_formats_command_lists_every_registered_item():
    r = CliRunner().invoke(cli, ["formats", "--markdown"])
    assert r.exit_code == 0, r.output
    for name in [*READERS, *WRITERS, *GGUF_TYPES]:
        assert f"| `{name}` |" in r.stdout, name
