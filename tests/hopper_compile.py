"""Compile a kernel of kernels/flash_hopper.py for sm_90a on any machine and report what ptxas made of it.

    python tests/hopper_compile.py KERNEL(fwd|dq|dkdv) HEAD_DIM CAUSAL(0|1) DTYPE(bf16|fp16) [N_K [ORDER(0|1|2)]]

N_K (default 1) picks the configuration flash_hopper.config gives that many keys; ORDER (default 0) the forward's and
dq pass's order of work, work_order.SNAKING, PAIRED or LISTED.

Prints one JSON line: shared memory bytes, local-memory (spill) instructions, wgmma and mbarrier instruction
counts, and the named barriers the compiler itself uses (those with a constant id; the key ring's own take theirs
from a register). Run without TRITON_INTERPRET: Triton's interpreter replaces the jit functions Gluon's reductions call.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from pope_lm.kernels import flash_hopper, work_order

# each pass's kernel in flash_hopper (or in another revision of it)
KERNELS = {"fwd": "_fwd_kernel", "dq": "_dq_kernel", "dkdv": "_dkdv_kernel"}
# fp32 arguments; the other tensors are in the input dtype, the other scalars i32
FP32 = ("Freqs", "Delta", "Lse", "Dvec", "DDelta", "sm_scale", "qk_scale")


def compile_for_sm90(kernel_name: str, head_dim: int, causal: bool, dtype: str, n_k: int = 1,
                     order: int = work_order.SNAKING, hopper=flash_hopper):
    """`kernel_name`'s Gluon kernel of `hopper` (flash_hopper, or another revision of it loaded as a module)."""
    kernel = getattr(hopper, KERNELS[kernel_name])
    launch = hopper.launch_options(kernel_name, head_dim, n_k, dtype == "fp16")
    constexprs = {name: value for name, value in launch.items() if name.isupper()} | {"CAUSAL": causal}
    if "ORDER" in kernel.arg_names:  # the forward's and the dq pass's order of work (flash_hopper._work)
        constexprs["ORDER"] = order
    options = {name: value for name, value in launch.items() if not name.isupper()}
    pointers = [name for name in kernel.arg_names if name[0].isupper() and name not in constexprs]
    # the listed order's table, int32; in the other orders flash_hopper passes q there, unread
    int32 = ("Listed",) if order == work_order.LISTED else ()
    signature = {name: "constexpr" if name in constexprs
                 else ("*" if name in pointers else "") + ("fp32" if name in FP32 else "i32" if name in int32
                                                           else dtype if name in pointers else "i32")
                 for name in kernel.arg_names}
    # Triton's divisibility hints at launch: pointers from the torch allocator and row strides (multiples of D) are
    # multiples of 16; the compiled code (vector widths) depends on them.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name in pointers or name.startswith("stride")}
    return triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def sass_of(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?(.*?)\s*;")


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of each SASS instruction, its predicate (@P0, @!PT, ...) left out."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.match, sass_of(cubin).splitlines()) if m]


def main() -> None:
    kernel_name, head_dim, causal, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    n_k = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    order = int(sys.argv[6]) if len(sys.argv) > 6 else work_order.SNAKING
    compiled = compile_for_sm90(kernel_name, head_dim, causal, dtype, n_k, order)
    words = [text.split() for _, text in sass_instructions(compiled.asm["cubin"])]
    opcodes = [w[0] for w in words]
    constant_barriers = {int(w[1].rstrip(","), 16) for w in words
                         if w[0].startswith(("BAR.SYNC", "BAR.ARV", "BAR.RED")) and w[1].startswith("0x")}
    print(json.dumps(dict(shared=compiled.metadata.shared,
                          local_memory=sum(op.startswith(("LDL", "STL")) for op in opcodes),
                          wgmma=sum(op.startswith("HGMMA") for op in opcodes),
                          mbarrier=sum(op.startswith("SYNCS") for op in opcodes),
                          compiler_barriers=sorted(constant_barriers))))


if __name__ == "__main__":
    main()
