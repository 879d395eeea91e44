"""The Triton scan's kernels, run on CPU by Triton's interpreter (CI has no GPU): forward into a
poisoned buffer, gradients of x, lam and h0, both lam shapes, with and without h0, T from 1 to
past two chunks, and chunk invariance. The GPU figures come from bench/scan_gpu.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    # A fresh interpreter: TRITON_INTERPRET is read when triton is first imported.
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.lru_online.triton_interpreter_check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_case_ran(errors):
    assert sum(key.startswith("forward ") for key in errors) == 3 * 2 * 2 * 2
    assert sum(key.startswith("grad ") for key in errors) == 2 * 2 * (2 + 3)
    assert "chunk invariance" in errors


def test_outputs_gradients_and_carried_state_match_the_float64_reference(errors):
    # NaN (an element the kernel never wrote into the poisoned buffer) fails the comparison too.
    too_far = {case: error for case, error in errors.items() if not error <= 1e-4}
    assert not too_far
