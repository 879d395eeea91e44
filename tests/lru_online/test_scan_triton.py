"""The Triton scan's kernel, run on CPU by Triton's interpreter (CI has no GPU): forward and
adjoint into poisoned buffers, the look-back through published aggregates, gradients of x, lam
and h0, both lam shapes, with and without h0, T from 1 to several chunks, several channel
blocks, and chunk invariance. On a GPU: `python -m tests.lru_online.triton_check --device cuda`;
the speed figures come from bench/scan_gpu.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.slow,  # the kernels under Triton's interpreter: about 40 s
]


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    # A fresh interpreter: TRITON_INTERPRET is read when triton is first imported.
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.lru_online.triton_check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_case_ran(errors):
    # 3 lengths x 2 lam shapes x with and without h0; h0's gradient only where there is one.
    assert sum(key.startswith("forward look-back only ") for key in errors) == 12
    assert sum(key.startswith("forward B=") for key in errors) == 12
    assert sum(key.startswith("adjoint ") for key in errors) == 12
    assert sum(key.startswith("grad ") for key in errors) == 12 * 2 + 6
    assert "chunk invariance" in errors
    # Once more with the tiling a GPU gets: 4 forward, 4 look-back only, 4 adjoint, 10 gradients.
    assert sum("default tiling" in key for key in errors) == 22


def test_outputs_gradients_and_carried_state_match_the_float64_reference(errors):
    # NaN (an element the kernel never wrote into the poisoned buffer) fails the comparison too.
    too_far = {case: error for case, error in errors.items() if not error <= 1e-4}
    assert not too_far


def compile_for_hopper(tiling, switches: dict) -> dict[str, str | bytes]:
    """The kernel compiled for sm_90 without a GPU: its PTX and cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lru_online.linear_scan import triton_backend

    constexprs = switches | {"CHUNK_SIZE": tiling.chunk, "BLOCK": tiling.block}
    pointers = {name: "*fp32" for name in triton_backend._scan_tiles.arg_names if name.endswith("_ptr")}
    signature = pointers | {"status_ptr": "*i32"} | dict.fromkeys(("T", "N", "n_seqs", "n_chunks", "n_blocks"), "i32")
    # As at run time for N = 256: pointers and N divisible by 16, which lets loads be 16 bytes wide.
    hinted = [i for i, name in enumerate(triton_backend._scan_tiles.arg_names) if name.endswith("_ptr") or name == "N"]
    source = ASTSource(
        triton_backend._scan_tiles,
        signature | dict.fromkeys(constexprs, "constexpr"),
        constexprs=constexprs,
        attrs={(i,): [["tt.divisibility", 16]] for i in hinted},
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": tiling.num_warps}).asm


SWITCHES = [
    {"TIME_VARYING": time_varying, "REVERSE": reverse, "HAS_START": True, "LAM_GRAD": reverse,
     "HAS_STATES_START": reverse, "PUBLISH_PREFIX": True}
    for time_varying in (False, True) for reverse in (False, True)
]  # fmt: skip


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: f"varying={s['TIME_VARYING']}-reverse={s['REVERSE']}")
def test_the_kernel_compiles_for_hopper_and_orders_its_publications(switches):
    # The interpreter runs programs one at a time, so it cannot show how tiles see each other's
    # results on a GPU. Compiled for sm_90 (no GPU needed): the status that announces a tile's
    # aggregate or prefix is written with release semantics after the data, and read with
    # acquire semantics before the data is; the data itself is read past the incoherent L1.
    from lru_online.linear_scan import triton_backend

    ptx = compile_for_hopper(triton_backend.tiling_for(256), switches)["ptx"]
    assert len(re.findall(r"atom\.global\.gpu\.release\.exch", ptx)) == 2  # aggregate, then prefix
    assert re.search(r"(ld|atom)\.global\.gpu\.acquire", ptx)  # the status poll
    assert re.search(r"ld\.global\.cg", ptx)


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: f"varying={s['TIME_VARYING']}-reverse={s['REVERSE']}")
def test_the_default_tiling_scans_within_threads_without_spilling(switches):
    # What makes the kernel memory-bound rather than instruction-bound: with tiling_for's layout
    # each thread scans its steps in registers, so there is no warp shuffle, and x and h move in
    # 16-byte loads and stores. The forward stays within the registers (no local-memory spills);
    # the backward, which also reads the states for lam's gradient, sits at the limit: Triton 3.6
    # (the GPU image's) keeps it in registers, 3.9 spills 56 bytes per thread when lam varies.
    import triton

    from lru_online.linear_scan import triton_backend

    asm = compile_for_hopper(triton_backend.tiling_for(256), switches)
    assert "shfl.sync" not in asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", asm["ptx"])
    assert re.search(r"st\.global(\.\w+)*\.v4\.b32", asm["ptx"])
    if switches["REVERSE"]:
        return
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(asm["cubin"])
        file.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", file.name], capture_output=True, text=True)
    assert usage.returncode == 0, usage.stderr
    assert re.search(r"\bSTACK:0\b", usage.stdout) and re.search(r"\bLOCAL:0\b", usage.stdout), usage.stdout


def test_cuda_tensors_get_the_kernel_in_complex64_only(monkeypatch):
    from dataclasses import replace

    import torch

    from lru_online.linear_scan import dispatch, triton_backend

    assert "triton" in dispatch.available_backends("cuda")
    assert dispatch._default_backend("cuda", torch.complex64) == "triton"
    assert dispatch._default_backend("cuda", torch.complex128) == "chunked"
    # Asked for by name, it refuses complex128 before launching anything.
    monkeypatch.setitem(dispatch._BACKENDS, "triton", replace(triton_backend.BACKEND, devices=frozenset({"cpu"})))
    lam, x = torch.full((3,), 0.5, dtype=torch.complex128), torch.ones(1, 4, 3, dtype=torch.complex128)
    with pytest.raises(TypeError, match="'triton' does not compute in torch.complex128"):
        dispatch.scan(lam, x, backend="triton")
