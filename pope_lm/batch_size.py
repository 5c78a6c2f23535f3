"""`trainer.micro_batch_size: auto`: the largest micro-batch that fits the card, chosen before training starts.

The candidates are the micro-batches that divide global_batch_size / world size, so that micro x world size x
accumulation is the global batch exactly (pope_lm/strategy.py). On CUDA each candidate, from the largest down, runs
real training steps of the configured model on this process's GPU until one fits; on the CPU, where nothing is
probed, auto takes the largest candidate not above `CPU_MAX`. A resumed run keeps its checkpoint's micro-batch.

Every rank of a multi-process run resolves on its own GPU (before the process group exists); once it exists,
`SameMicroBatchOnEveryRank` stops every rank with one error if they disagree, since different micro-batches would
mean different accumulation counts and a hang in the first gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from pope_lm.config import ConfigError, RunConfig
from pope_lm.lit_module import LitGPT
from pope_lm.strategy import world_size

log = logging.getLogger("pope_lm")

# Share of the card's memory the probed peak may use. What the probe does not see comes out of the rest: the CUDA
# context and cuBLAS/NCCL workspaces (outside PyTorch's allocator), the allocator's fragmentation over thousands
# of steps (reserved memory exceeds allocated), DDP's gradient buckets (a second copy of the gradients) or
# DeepSpeed's communication buckets, what torch.compile allocates while it compiles, and the memory pool of CUDA
# graphs (trainer.compile_mode=reduce-overhead), with which accumulating runs also keep their fp32 gradients
# through the forward pass (LitGPT._keeps_gradients).
HEADROOM = 0.9
# On the CPU nothing is probed: host memory rarely binds for the small models a CPU trains, and tokens/s barely
# grows with the micro-batch there. 8 keeps a smoke run of a GPU recipe (124m: 64 x 1024 per step) at a few GB of
# host memory, where the whole global batch at once would need its 13 GB of fp32 logits alone.
CPU_MAX = 8
GIB = 2**30

# A micro-batch size -> the peak allocated bytes of training steps at that size; raises torch.cuda.OutOfMemoryError
# when they do not fit. `training_step_probe` is the real one; tests pass fakes.
ProbeStep = Callable[[int], int]


def candidates(global_batch_size: int, world: int) -> list[int]:
    """The micro-batches that fill `global_batch_size` exactly on `world` ranks, largest first."""
    if global_batch_size % world:
        raise ConfigError(f"'trainer.global_batch_size' ({global_batch_size}) is not divisible by the world size "
                          f"(trainer.devices x trainer.num_nodes = {world}), so trainer.micro_batch_size=auto has "
                          f"no candidate")
    per_rank = global_batch_size // world
    return [size for size in range(per_rank, 0, -1) if per_rank % size == 0]


def resolve_micro_batch_size(cfg: RunConfig, accelerator: str, precision: str,
                             resumed: dict[str, Any] | None = None) -> RunConfig:
    """`cfg` with trainer.micro_batch_size=auto replaced by a number (any other value is returned as it is).

    `resumed` is the config stored in the checkpoint the run resumes from, if any.
    """
    if cfg.trainer.micro_batch_size != "auto":
        return cfg
    sizes = candidates(cfg.trainer.global_batch_size, world_size(cfg))
    saved = (resumed or {}).get("trainer", {}).get("micro_batch_size")
    if saved in sizes:
        # The data stream's resume state includes the micro-batch: another one would be refused (or restart the
        # epoch, data.layout_change), and the run already trained at this one.
        size, reason = saved, "kept from the checkpoint this run resumes"
    elif accelerator != "gpu":
        size = next(s for s in sizes if s <= CPU_MAX)
        reason = f"on the CPU nothing is probed: the largest candidate not above {CPU_MAX}"
    else:
        device = probe_device()
        total = torch.cuda.get_device_properties(device).total_memory
        size, reason = choose_micro_batch(sizes, training_step_probe(cfg, precision, device), total)
    if rank_zero_only.rank == 0:  # every rank resolves; one line is enough (SameMicroBatchOnEveryRank compares)
        log.info("trainer.micro_batch_size=auto -> %d (%s)", size, reason)
    return replace(cfg, trainer=replace(cfg.trainer, micro_batch_size=size))


def choose_micro_batch(sizes: Sequence[int], step: ProbeStep, total_bytes: int,
                       headroom: float = HEADROOM) -> tuple[int, str]:
    """The first of `sizes` (largest first) whose probed peak stays under headroom x total_bytes, and why.

    Largest down rather than doubling up from 1: memory grows with the micro-batch, so the first size that fits is
    the answer, and the sizes above it fail fast (out of memory partway through a forward) while doubling would
    run a complete probe at every size below the answer.
    """
    budget = headroom * total_bytes
    rejected = ""
    for size in sizes:
        peak = _probe(step, size)
        if peak is not None and peak <= budget:
            why = f"; {rejected}" if rejected else "; the largest candidate, global batch / world size"
            return size, f"peak {peak / GIB:.1f} GiB of {total_bytes / GIB:.1f} GiB{why}"
        rejected = (f"{size} ran out of memory" if peak is None else
                    f"{size} peaked at {peak / GIB:.1f} GiB, over {headroom:.0%} of the card")
    raise ConfigError(f"'trainer.micro_batch_size' auto: no micro-batch fits in {headroom:.0%} of the card's "
                      f"{total_bytes / GIB:.1f} GiB ({rejected}); set model.activation_checkpointing=true, shorten "
                      f"data.seq_len, shard the model state over several GPUs with trainer.strategy=deepspeed or "
                      f"offload it to the CPU (trainer.strategy=deepspeed trainer.offload_optimizer=true)")


def _probe(step: ProbeStep, size: int) -> int | None:
    """The peak of `step` at `size`, or None when it ran out of memory; the memory it used is released either way."""
    try:
        peak: int | None = step(size)
    except torch.cuda.OutOfMemoryError:
        peak = None
    # Out here the exception and its traceback, which holds the step's tensors, are gone: collect the module and
    # optimizer and hand the cached blocks back, so the next try (or training) starts from an empty, unfragmented
    # allocator. Both are no-ops where CUDA was never initialized.
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def probe_device() -> torch.device:
    """This process's GPU, as Lightning will pick it (it sets the device only once the Trainer starts): the local
    rank from torchrun or Lightning's own launcher (LOCAL_RANK, checked first as Lightning does) or srun."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))))


def training_step_probe(cfg: RunConfig, precision: str, device: torch.device) -> ProbeStep:
    """Two training steps of the run's model at a given micro-batch on `device`, as LitGPT trains it.

    The model, optimizer (LitGPT's: fused AdamW on CUDA) and batch are made afresh for each size. Two steps because
    AdamW allocates its moments in the first step's optimizer step, after that step's backward: only the second
    holds them beside the activations and gradients, as every later training step does. The steps run eager:
    torch.compile fuses elementwise ops and keeps fewer activations, so a compiled run peaks lower and the choice
    errs on the safe side. Under DeepSpeed ZeRO the probe keeps the whole optimizer state (unsharded) on the GPU,
    more than each rank holds in training, so it is conservative there as well.
    """
    param_dtype, autocast_dtype = _probe_dtypes(precision)

    def step(micro_batch_size: int) -> int:
        torch.cuda.reset_peak_memory_stats(device)
        with torch.random.fork_rng(devices=[device]), torch.device(device):  # training's seeded init stays as it was
            # Initialised on the GPU (much faster than on the CPU at 774M); .to() records the device in LitGPT, whose
            # configure_optimizers picks the fused AdamW from it.
            module = LitGPT(cfg).to(device=device, dtype=param_dtype)
            optimizer = module.configure_optimizers()["optimizer"]
            batch = torch.randint(0, cfg.model.vocab_size, (micro_batch_size, cfg.data.seq_len + 1))
            for _ in range(2):
                with torch.autocast("cuda", autocast_dtype) if autocast_dtype else contextlib.nullcontext():
                    loss, _ = module.score(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # as LitGPT.optimizer_step does
        return torch.cuda.max_memory_allocated(device)

    return step


def _probe_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """Parameter dtype and autocast dtype (None: no autocast) of a Lightning precision: bf16-mixed (and Lightning's
    older "bf16") -> (fp32, bf16), bf16-true -> (bf16, None). Anything else that is not 64-bit (32-true, other
    plugins) is probed in fp32, which needs at least as much memory."""
    kind, _, mode = precision.partition("-")
    dtype = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}.get(kind, torch.float32)
    if dtype in (torch.bfloat16, torch.float16) and mode != "true":
        return torch.float32, dtype
    return dtype, None


class SameMicroBatchOnEveryRank(L.Callback):
    """Stops every rank with one error when the ranks resolved trainer.micro_batch_size=auto differently.

    Runs in `setup`, the first hook after the process group exists. All ranks gather all values and raise
    together; a rank raising alone would leave the others waiting in their next collective.
    """

    def __init__(self, micro_batch_size: int) -> None:
        self.micro_batch_size = micro_batch_size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        mine = torch.tensor(self.micro_batch_size, device=trainer.strategy.root_device)
        check_same_micro_batch(trainer.strategy.all_gather(mine).tolist())


def check_same_micro_batch(sizes: list[int]) -> None:
    """Raise a one-line ConfigError naming each rank's micro-batch unless all `sizes` (index = rank) agree."""
    if len(set(sizes)) > 1:
        ranks = ", ".join(f"rank {rank}: {size}" for rank, size in enumerate(sizes))
        raise ConfigError(f"'trainer.micro_batch_size' auto chose different micro-batches on the ranks ({ranks}); "
                          f"set trainer.micro_batch_size={min(sizes)} (the smallest) explicitly")
