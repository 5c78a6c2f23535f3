"""benchmarks/attention.py's --revision: another revision's kernels/flash.py runs beside this checkout's in one
process (its custom ops under their own namespace), so a kernel change is timed against its predecessor in the
same run. On the CPU, through Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parent.parent


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("attention_benchmark", REPO / "benchmarks" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_revision_loads_beside_the_checkouts_kernels_and_computes_the_same_attention(tmp_path: Path) -> None:
    bench = _benchmark_module()
    previous = tmp_path / "flash_previous.py"
    shutil.copy(REPO / "kernels" / "flash.py", previous)
    revision = bench.load_revision("previous", previous)
    assert revision._fwd_op._namespace == "pope_lm_previous"

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 19, 32, generator=g, requires_grad=True) for _ in range(3))
    delta = -2 * math.pi * torch.rand(2, 32, generator=g)
    ours, theirs = bench.pope_attention(q, k, v, delta), revision.pope_attention(q, k, v, delta)
    torch.testing.assert_close(theirs, ours)
    theirs.sum().backward()  # the revision's backward is registered with its own forward
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_a_revision_name_that_is_not_an_identifier_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="NAME must be a Python identifier"):
        _benchmark_module().load_revision("v-1", tmp_path / "unused.py")
