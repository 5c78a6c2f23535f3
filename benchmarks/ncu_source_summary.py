r"""Where the warps of each kernel wait, from Nsight Compute's sampled stalls per SASS instruction.

ncu's SourceCounters section samples every warp's program counter and stall reason. Exported as CSV (`--page source`),
that is one row per instruction; this script sums it per kernel into what the attention kernels' tuning needs:

- the share of samples in per-program code (prologue, epilogue, partition setup: instructions executed at most as
  often as the kernel's first one, which every warp of every program runs once) against the loops' (a loop that
  averages fewer than three iterations per warp of its partition would count as per-program), since at the
  pretraining shape a program streams only ~9 tiles;
- the stall reasons of each part, the opcodes of the per-program part, and the instructions with the most samples.

Run on the device machine (the commands of results/h100-h200-2026-11-26-session14, log 2):

    ncu --clock-control none --nvtx --nvtx-include "profiled/" \
        --kernel-name regex:"_fwd_kernel|_dq_kernel|_dkdv_kernel" --section SourceCounters -o src \
        python3 benchmarks/attention_profile.py --shape 16 12 1024 64
    ncu -i src.ncu-rep --page source --csv --print-source sass > src.csv
    python3 benchmarks/ncu_source_summary.py src.csv
"""

from __future__ import annotations

import argparse
import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass
class Instruction:
    source: str
    samples: int
    executed: int
    stalls: dict[str, int]

    @property
    def opcode(self) -> str:
        words = self.source.split()
        return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]


@dataclass
class Kernel:
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def warp_launches(self) -> int:
        """Executions of the kernel's first instruction: every warp of every program runs it once."""
        return self.instructions[0].executed


def parse(text: str) -> list[Kernel]:
    """The kernels of an `ncu --page source --csv` export, each a '"Kernel Name","<name>",' line and its table."""
    kernels = []
    for block in text.split('"Kernel Name",')[1:]:
        name_line, table = block.split("\n", 1)
        rows = list(csv.reader(io.StringIO(table)))
        header, body = rows[0], [row for row in rows[1:] if len(row) == len(rows[0])]
        column = {name: i for i, name in enumerate(header)}
        stall_columns = [name for name in header if name.startswith("stall_") and "(Not Issued)" not in name]
        kernel = Kernel(name_line.strip().strip(",").strip('"'))
        for row in body:
            kernel.instructions.append(Instruction(
                source=row[column["Source"]].strip(),
                samples=int(row[column[SAMPLES]] or 0),
                executed=int((row[column[EXECUTED]] or "0").replace(",", "")),
                stalls={name.removeprefix("stall_"): int(row[column[name]] or 0) for name in stall_columns}))
        kernels.append(kernel)
    return kernels


def _shares(counter: Counter, total: int, top: int) -> str:
    return ", ".join(f"{key} {value / max(total, 1):.0%}" for key, value in counter.most_common(top) if value)


def summary(kernel: Kernel, top: int = 12) -> str:
    """Per-program against loop samples, their stall reasons, per-program opcodes, and the top instructions."""
    once_limit = kernel.warp_launches()
    total = sum(i.samples for i in kernel.instructions)
    lines = [f"{kernel.name}: {total} samples"]
    for part, members in (("per program", [i for i in kernel.instructions if i.executed <= once_limit]),
                          ("loops", [i for i in kernel.instructions if i.executed > once_limit])):
        samples = sum(i.samples for i in members)
        stalls = Counter()
        for i in members:
            stalls.update(i.stalls)
        lines.append(f"  {part}: {samples / max(total, 1):.0%} of samples; stalls: "
                     + _shares(stalls, sum(stalls.values()), 6))
        if part == "per program":
            opcodes = Counter()
            for i in members:
                opcodes[i.opcode] += i.samples
            lines.append("    by opcode: " + _shares(opcodes, samples, 8))
    lines.append("  top instructions (share of samples, executions, leading stalls):")
    for i in sorted(kernel.instructions, key=lambda i: -i.samples)[:top]:
        stalls = ", ".join(f"{k} {v}" for k, v in Counter(i.stalls).most_common(2) if v)
        lines.append(f"    {i.samples / max(total, 1):5.1%} {i.executed:>8}  {i.source[:64]:64}  {stalls}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="`ncu -i REPORT --page source --csv --print-source sass` output")
    parser.add_argument("--top", type=int, default=12, help="instructions listed per kernel")
    args = parser.parse_args()
    for kernel in parse(args.csv.read_text()):
        print(summary(kernel, args.top), end="\n\n")


if __name__ == "__main__":
    main()
