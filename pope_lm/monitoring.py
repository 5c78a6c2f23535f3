"""Training speed metrics (tokens/s, MFU) and the progress display, which counts optimizer steps."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from tqdm import tqdm

from pope_lm.lit_module import log_host_value

# Dense bf16 peak (TFLOP/s) by device name, for MFU when trainer.peak_tflops is not set.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_flops(configured_tflops: float) -> float | None:
    """Per-device peak FLOP/s: the configured value, else a known GPU's bf16 peak, else None (no MFU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


class SpeedMonitor(L.Callback):
    """Logs tokens/s (all ranks together) and MFU, averaged over the optimizer steps between log points, and on a
    GPU the peak memory PyTorch has allocated on rank 0 so far (`gpu/peak_allocated_gib`) and the peak its caching
    allocator has held from the card (`gpu/peak_reserved_gib`: the allocations plus cached free blocks, what the
    process needs of the card beyond the CUDA context and libraries).

    MFU = tokens/s x model FLOPs per token / (world size x per-device peak); FLOPs per token come from
    `GPT.flops_per_token` (6N plus the attention terms, PoPE's Q K^T counted at width 2D).

    The time validations take is left out of the windows, so that the speed is the training's: in a 124M run on an
    H100 the window holding a validation read 129K tokens/s against 478K around it (session 27); left out, 540K
    against 511K on an H200 (session 36: it reads high by the lead the host regains over the GPU after the
    validation's synchronization). A checkpoint's save stays in: the loop does wait for its snapshot
    (AtomicCheckpointIO).
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None, log_every: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.log_every = log_every
        self._window_start: float | None = None
        self._window_step = 0
        self._validation_start: float | None = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._window_start is not None:
            _finish_queued_work(pl_module)  # the training steps queued so far count as training
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None and self._window_start is not None:
            _finish_queued_work(pl_module)
            self._window_start += time.perf_counter() - self._validation_start
        self._validation_start = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._window_start is None:
            self._window_start, self._window_step = time.perf_counter(), step
            return
        if step - self._window_step < self.log_every:
            return
        now = time.perf_counter()
        tokens_per_s = (step - self._window_step) * self.tokens_per_step / (now - self._window_start)
        metrics = {"tokens_per_s": tokens_per_s}
        if self.peak is not None:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (trainer.world_size * self.peak)
        for name, value in metrics.items():
            log_host_value(pl_module, name, value, prog_bar=True, rank_zero_only=True)
        if pl_module.device.type == "cuda":  # the caching allocator's own counts: read on the host, no device sync
            for name, peak_bytes in (("gpu/peak_allocated_gib", torch.cuda.max_memory_allocated(pl_module.device)),
                                     ("gpu/peak_reserved_gib", torch.cuda.max_memory_reserved(pl_module.device))):
                log_host_value(pl_module, name, peak_bytes / 2**30, rank_zero_only=True)
        self._window_start, self._window_step = now, step


def _finish_queued_work(pl_module: L.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def progress_display(refresh_rate: int) -> ProgressBar:
    """A tqdm bar on a terminal; in a file or a pipe (a Slurm log), a line per refresh point."""
    return StepProgressBar(refresh_rate=refresh_rate) if sys.stdout.isatty() else StepProgressLines(refresh_rate)


def shown_metrics(metrics: dict[str, Any], trainer: L.Trainer) -> dict[str, Any]:
    """The metrics both displays show, formatted: the loss first, the logger's version number left out."""
    metrics = {k: v for k, v in metrics.items() if k != "v_num"}
    loss = trainer.callback_metrics.get("train/loss")  # logged without prog_bar, see LitGPT.training_step
    if loss is not None:
        metrics = {"train/loss": f"{loss.item():.3f}", **metrics}
    shown = {"tokens_per_s": "{:,.0f}", "mfu": "{:.1%}"}
    return {k: (shown[k].format(v) if k in shown else v) for k, v in metrics.items()}


def _is_refresh_point(step: int, refresh_rate: int, max_steps: int) -> bool:
    return step % refresh_rate == 0 or step == max_steps


class StepProgressBar(TQDMProgressBar):
    """The bar counts optimizer steps towards max_steps (the data stream has no length).

    It redraws every `refresh_rate` steps only: reading the metrics copies them to the host, which would
    otherwise synchronize with the GPU after every step.
    """

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)  # a resumed run starts mid-epoch, without on_train_epoch_start

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def _count_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = trainer.global_step
        bar.set_description("step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar.n != step and _is_refresh_point(step, self.refresh_rate, trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)  # drawn once, by the refresh below
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return shown_metrics(super().get_metrics(trainer, pl_module), trainer)


class StepProgressLines(ProgressBar):
    """The progress as lines, for output that is not a terminal: a line per refresh point, one per validation.

    tqdm redraws its bar with carriage returns, so in a file a whole run is one line. srun forwards such a line in
    pieces, and the job's other output lands between them, even inside a bar character's bytes (invalid UTF-8).
    """

    def __init__(self, refresh_rate: int) -> None:
        super().__init__()
        self.refresh_rate = refresh_rate
        self._enabled = True
        self._start = (0.0, 0)  # time and step at which this process started training
        self._printed_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start = (time.perf_counter(), trainer.global_step)  # a resumed run starts mid-way
        self._printed_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if not self._enabled or step == self._printed_step or not _is_refresh_point(step, self.refresh_rate, total):
            return
        self._printed_step = step
        elapsed = time.perf_counter() - self._start[0]
        rate = (step - self._start[1]) / elapsed
        left = tqdm.format_interval((total - step) / rate)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if not k.startswith("val/")}
        self._print(f"step {step}/{total} [{tqdm.format_interval(elapsed)}<{left}, {rate:.2f} steps/s]", metrics)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("val/")}
            self._print(f"validation at step {trainer.global_step}:", metrics)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return shown_metrics(super().get_metrics(trainer, pl_module), trainer)

    @staticmethod
    def _print(head: str, metrics: dict[str, Any]) -> None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"{head} {shown}", flush=True)
