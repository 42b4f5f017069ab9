"""Session fixtures of the bad-input corpus: valid artifacts, the cases, and the fork server."""

from __future__ import annotations

import pytest

from tests.badinputs.corpus import Case, Good, build_corpus, build_good
from tests.badinputs.runner import ForkServer


@pytest.fixture(scope="session")
def good(tmp_path_factory) -> Good:
    return build_good(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, good) -> dict[str, Case]:
    return {c.name: c for c in build_corpus(tmp_path_factory.mktemp("corpus"), good)}


@pytest.fixture(scope="session")
def server():
    s = ForkServer()
    yield s
    s.close()
