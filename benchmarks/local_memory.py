"""Where a `pope-lm train` process's GPU memory goes outside PyTorch's allocator, stage by stage.

The card's memory in use (cudaMemGetInfo) minus what PyTorch's caching allocator has reserved is the CUDA context,
library workspaces, loaded kernels, and local memory: a kernel that spills registers needs local memory per thread,
and on launch the driver raises the context's per-thread size to the largest need so far and reserves it for every
thread the card can hold (SMs x 2048 on an H100), without giving it back. This script trains a recipe exactly as
`pope-lm train` does (its `train()`, with one more callback) and prints, at each stage, the memory outside the
allocator, the local memory within it, and the Triton kernels loaded so far (inductor's and pope-lm's) that need the
most local memory per thread.

    python benchmarks/local_memory.py recipes/124m.yaml data.dataset=/tmp/pycode trainer.max_steps=20   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import lightning as L
import torch
from train_throughput import local_memory_gib, outside_allocator_gib, resident_threads

from pope_lm.config import load_config
from pope_lm.train import train


def loaded_triton_kernels() -> dict[int, tuple[str, int, int]]:
    """{id: (name, local bytes per thread, registers per thread)} of every compiled Triton kernel loaded in the process.
    Triton reads CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as it loads a kernel and keeps it, divided by 4, as n_spills."""
    return {id(obj): (obj.name, 4 * int(obj.n_spills), int(obj.n_regs)) for obj in gc.get_objects()
            if type(obj).__name__ == "CompiledKernel" and getattr(obj, "module", None) is not None}


class MemoryProbe(L.Callback):
    """Prints the memory outside the allocator at the run's stages: before training, after the initial validation
    (the evaluation graph compiled and run), after the first optimizer step (the training graph), and at the end."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.first_step_reported = False

    def report(self, stage: str, device: torch.device) -> None:
        if device.type != "cuda":
            return
        threads = resident_threads(device)
        print(f"{stage}: outside the allocator {outside_allocator_gib(device):.2f} GiB (local memory "
              f"{local_memory_gib(device):.2f}), reserved {torch.cuda.memory_reserved(device) / 2**30:.2f} GiB",
              flush=True)
        by_local_memory = sorted(loaded_triton_kernels().values(), key=lambda kernel: -kernel[1])
        for name, local, regs in by_local_memory[: self.top]:
            print(f"  {local:8,d} B local ({local * threads / 2**30:5.2f} GiB for {threads:,} threads), "
                  f"{regs:3d} registers  {name}", flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report("before training", pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == 0 and args[-1] == 0:  # the first micro-batch: after the step-0 validation
            self.report("after the initial validation", pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == 1 and not self.first_step_reported:
            self.first_step_reported = True
            self.report("after the first optimizer step", pl_module.device)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(f"after {trainer.global_step} steps", pl_module.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for pope-lm train")
    parser.add_argument("--top", type=int, default=5, help="kernels listed at each stage")
    args = parser.parse_args()
    train(load_config(args.recipe, args.overrides), [MemoryProbe(args.top)])


if __name__ == "__main__":
    main()
