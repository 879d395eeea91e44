"""The real services of the servers profile, started through infra/ for this test session.

If `lru-online infra up --dir DIR` already runs them (LRU_ONLINE_INFRA_DIR=DIR), they are used
and left running; otherwise they start in a temporary folder and stop at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from infra import services


@pytest.fixture(scope="session")
def infra() -> Path:
    given = os.environ.get("LRU_ONLINE_INFRA_DIR")
    if given:
        root = Path(given)
    else:
        # Postgres runs as its own user when the tests run as root: the folder must be open to it.
        root = Path(tempfile.mkdtemp(prefix="lru-online-infra-"))
        root.chmod(0o755)
    services.up(root)
    yield root
    if not given:
        services.down(root)
        shutil.rmtree(root, ignore_errors=True)
