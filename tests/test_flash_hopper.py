"""The Hopper kernels (kernels/flash_hopper.py: forward, dq and dk/dv passes) compiled for sm_90a on the CPU.

Gluon kernels do not run in Triton's interpreter, so CI cannot execute them (benchmarks/attention.py checks their
numbers on an H100). What CI can check is that every kernel and configuration flash.py would launch compiles,
through this Triton's Gluon front end and ptxas, and fits its register budget: a spill to local memory would put
the producer's phase tile or a consumer's accumulators behind memory loads and silently cost much of the speed;
and that the named barriers the key ring releases on are ones the compiler does not use itself. Also that
benchmarks/hopper_sass.py, the per-loop SASS report the attention notes count instructions with, still finds the
forward's loops.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pope_lm.kernels import flash, work_order

flash_hopper = flash.flash_hopper
SMEM_PER_BLOCK = 227 * 1024  # an H100's shared memory per thread block


def compiler_output(script: Path, *args: str) -> str:
    """The standard output of a compiling script: in a process of its own, since the tests' TRITON_INTERPRET=1
    (conftest.py) breaks Gluon's compilation."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def compiled_for_sm90(kernel: str, head_dim: int, causal: bool, dtype: str, n_k: int = 1,
                     order: int = work_order.SNAKING) -> dict:
    output = compiler_output(Path(__file__).with_name("hopper_compile.py"), kernel, str(head_dim), str(int(causal)),
                             dtype, str(n_k), str(order))
    return json.loads(output.splitlines()[-1])


# every configuration flash.py launches, by the keys that select it (a causal-only one never for non-causal attention:
# flash_hopper.handles), the forward and the dq pass in each of their orders of work (flash_hopper._work; the listed
# one causal only: work_order.choose)
LAUNCHED = [(kernel, head_dim, n_k, causal, dtype, order)
            for configs, n_k in (((flash_hopper.CONFIGS, 1), (flash_hopper.LONG_CONFIGS, flash_hopper.LONG_KEYS))
                                 if flash_hopper else ())
            for (kernel, head_dim), config in sorted(configs.items())
            for causal, dtype in ((True, "bf16"), (False, "fp16")) if causal or not config.causal_only
            for order in ((work_order.SNAKING,) if kernel == "dkdv" else
                          (work_order.SNAKING, work_order.PAIRED) + ((work_order.LISTED,) if causal else ()))]


@pytest.mark.skipif(flash_hopper is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("kernel, head_dim, n_k, causal, dtype, order", LAUNCHED)
def test_hopper_kernels_compile_for_sm90_without_spills(kernel, head_dim, n_k, causal, dtype, order):
    report = compiled_for_sm90(kernel, head_dim, causal, dtype, n_k, order)
    assert report["wgmma"] > 0 and report["mbarrier"] > 0, report  # the warp-specialized kernel it should be
    assert report["local_memory"] == 0, f"{kernel} D={head_dim} {n_k} keys: registers spill to local memory: {report}"
    assert report["shared"] <= SMEM_PER_BLOCK, report


@pytest.mark.skipif(flash_hopper is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("kernel, head_dim, n_k", [("fwd", 64, 1), ("dq", 32, 1), ("fwd", 64, 1 << 16)])
def test_key_ring_named_barriers_are_ones_the_compiler_leaves_free(kernel, head_dim, n_k):
    # the forward's and dq pass's consumers release the key ring on named barriers _STAGE_BARRIER + stage; a Triton
    # that used those ids for its own bar.syncs would make the two meet at one barrier and hang or race
    report = compiled_for_sm90(kernel, head_dim, True, "bf16", n_k)
    first = flash_hopper._STAGE_BARRIER.value
    assert report["compiler_barriers"] and max(report["compiler_barriers"]) < first, report
    assert first + flash_hopper.config(kernel, head_dim, n_k).stages <= 16  # a CTA has 16 named barriers


@pytest.mark.skipif(flash_hopper is None, reason="this Triton has no Gluon")
def test_hopper_sass_reports_the_long_forwards_consumer_and_producer_loops():
    # benchmarks/hopper_sass.py, which the attention notes' instruction counts come from: one loop a key tile for each
    # consumer (its products on the tensor cores) and one for the producer (none), and no spills in any region
    report = compiler_output(Path(__file__).parents[1] / "benchmarks" / "hopper_sass.py", "fwd", "64", "--keys",
                             str(flash_hopper.LONG_KEYS), "--order", str(work_order.PAIRED)).splitlines()
    options = flash_hopper.launch_options("fwd", 64, flash_hopper.LONG_KEYS)
    assert report[0].startswith("fwd D=64 causal bf16"), report
    assert f"registers {options['CONSUMER_REGS']}/{options['PRODUCER_REGS']}," in report[0], report
    spills = [int(region.rsplit(": ", 1)[1]) for region in report[1].split(": ", 1)[1].split(" | ")]
    assert len(spills) > 4 and not any(spills), report[1]
    wgmmas = [int(re.search(r"(\d+) HGMMA;", line).group(1)) for line in report if line.startswith("loop at")]
    assert sorted(n > 0 for n in wgmmas) == [False, True, True], report
