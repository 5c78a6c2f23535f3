"""What ptxas made of one Hopper (Gluon) attention pass, compiled for sm_90a on any machine (no GPU needed).

Prints, for the pass's configuration (flash_hopper.launch_options) or one with other registers:
- the local-memory (spill) instructions of each register region, in the order the SASS switches between them
  (setmaxnreg: "alloc 184" is a warpgroup raising its registers to 184, "dealloc 120" one lowering them);
- each innermost loop of at least --min-loop instructions: its instruction count, barriers and most common opcodes.
  The forward's consumer and producer loops are one key tile each; the notes (attention_notes.md) count instructions
  a tile this way.

    python benchmarks/hopper_sass.py fwd 64 --keys 16384 --order 1     # the long forward, paired order
    python benchmarks/hopper_sass.py dq 128 --dtype fp16 --regs 168 176
    python benchmarks/hopper_sass.py fwd 64 --revision old.py          # another revision's kernels/flash_hopper.py

The SASS depends on Triton's version (and its ptxas): run it with the version whose code you mean (the GPU image's
triton 3.6 in a virtual environment of its own, say). Without TRITON_INTERPRET: Triton's interpreter replaces the jit
functions Gluon's reductions call.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hopper_compile import compile_for_sm90, sass_instructions
from hopper_program_cost import load_revision

from pope_lm.kernels import flash, work_order

_BRANCH_BACK = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
_REGION = re.compile(r"USETMAXREG\.(TRY_ALLOC|DEALLOC)\.CTAPOOL (?:UP\d, )?(?:\w+, )?(0x[0-9a-f]+)")


@dataclasses.dataclass
class Loop:
    address: int
    instructions: list[str]

    def opcodes(self) -> collections.Counter:
        # the opcode without its modifiers: "BAR.SYNC.DEFER_BLOCKING ..." -> "BAR"
        return collections.Counter(i.split()[0].split(".")[0] for i in self.instructions)

    def count(self, prefix: str) -> int:
        return sum(i.startswith(prefix) for i in self.instructions)


def innermost_loops(code: list[tuple[int, str]], min_length: int) -> list[Loop]:
    """The loops (a branch back to an earlier address, and everything from there) of at least min_length
    instructions that hold no other such loop."""
    index = {address: i for i, (address, _) in enumerate(code)}
    spans = []
    for i, (address, text) in enumerate(code):
        m = _BRANCH_BACK.search(text)
        if m and int(m.group(1), 16) < address and int(m.group(1), 16) in index:
            start = index[int(m.group(1), 16)]
            if i - start + 1 >= min_length:
                spans.append((start, i))
    innermost = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [Loop(code[a][0], [text for _, text in code[a:b + 1]]) for a, b in sorted(set(innermost))]


def spills_by_region(code: list[tuple[int, str]]) -> list[tuple[str, int]]:
    """Local-memory instructions between register switches (setmaxnreg), in SASS order."""
    regions, name, spills = [], "start", 0
    for _, text in code:
        m = _REGION.search(text)
        if m:
            regions.append((name, spills))
            name = f"{'alloc' if m.group(1) == 'TRY_ALLOC' else 'dealloc'} {int(m.group(2), 16)}"
            spills = 0
        elif re.search(r"\b(LDL|STL)\b", text):
            spills += 1
    return [*regions, (name, spills)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=("fwd", "dq", "dkdv"))
    parser.add_argument("head_dim", type=int)
    parser.add_argument("--non-causal", dest="causal", action="store_false")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--keys", type=int, default=1, help="n_k, which picks the configuration (LONG_CONFIGS)")
    parser.add_argument("--order", type=int, default=work_order.SNAKING,
                        help="order of work of the forward and dq pass: 0 snaking, 1 paired, 2 listed")
    parser.add_argument("--revision", type=Path, help="another revision's kernels/flash_hopper.py")
    parser.add_argument("--regs", type=int, nargs=2, metavar=("CONSUMER", "PRODUCER"),
                        help="registers a thread of each consumer and of the producer, instead of the configuration's")
    parser.add_argument("--min-loop", type=int, default=100, help="the shortest loop reported, in instructions")
    args = parser.parse_args()

    # a module of its own, so that --regs changes no one else's configuration
    hopper = load_revision(args.revision or Path(flash.flash_hopper.__file__))
    if args.regs:  # in the table hopper.config reads for these keys
        key = (args.kernel, args.head_dim)
        table = hopper.LONG_CONFIGS if args.keys >= hopper.LONG_KEYS and key in hopper.LONG_CONFIGS else hopper.CONFIGS
        table[key] = dataclasses.replace(table[key], consumer_regs=args.regs[0], producer_regs=args.regs[1],
                                         fp16_regs=None)
    compiled = compile_for_sm90(args.kernel, args.head_dim, args.causal, args.dtype, args.keys, args.order, hopper)
    code = sass_instructions(compiled.asm["cubin"])
    options = hopper.launch_options(args.kernel, args.head_dim, args.keys, args.dtype == "fp16")
    attention = "causal" if args.causal else "non-causal"
    print(f"{args.kernel} D={args.head_dim} {attention} {args.dtype}, {args.keys} keys, order {args.order}: registers "
          f"{options['CONSUMER_REGS']}/{options['PRODUCER_REGS']}, shared memory {compiled.metadata.shared} B, "
          f"{len(code)} instructions")
    print("local-memory instructions by register region: "
          + " | ".join(f"{name}: {n}" for name, n in spills_by_region(code)))
    for loop in innermost_loops(code, args.min_loop):
        common = ", ".join(f"{op} {n}" for op, n in loop.opcodes().most_common(12))
        print(f"loop at {loop.address:#x}: {len(loop.instructions)} instructions, {loop.count('BAR.SYNC')} BAR.SYNC, "
              f"{loop.count('BAR.ARV')} BAR.ARV, {loop.count('HGMMA')} HGMMA; {common}")


if __name__ == "__main__":
    main()
