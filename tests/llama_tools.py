"""llama.cpp's ``llama-quantize`` and ``llama-imatrix``, as tools/build_llama_tools.sh builds and caches them.

The script builds them from the sources vendored in the installed llama-cpp-python's sdist into
``~/.cache/gemma2-convert/llama-tools/<llama_cpp version>/bin`` (``llama_runner.llama_tools_dir``); .ci/run runs
it before the tests. A test that needs a binary which is not
there fails with the command that builds it — it does not skip, since CI always has them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gemma2_convert.pipeline.llama_runner import llama_tools_dir

TOOLS = ("llama-quantize", "llama-imatrix")


def llama_tool(name: str) -> Path:
    """The path of ``name`` (one of ``TOOLS``); fails the calling test when it has not been built."""
    assert name in TOOLS, name
    path = llama_tools_dir() / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build llama.cpp's tools first with `bash "
                    "tools/build_llama_tools.sh` (about 5 minutes; .ci/run does it)", pytrace=False)
    return path


def run_tool(name: str, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a tool; fails the test with its output when it exits non-zero."""
    cmd = [str(llama_tool(name)), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}",
                    pytrace=False)
    return r


@pytest.fixture
def llama_imatrix() -> Path:
    return llama_tool("llama-imatrix")


@pytest.fixture
def llama_quantize() -> Path:
    return llama_tool("llama-quantize")
