"""The progress display: a tqdm bar on a terminal, lines elsewhere (the lines themselves: tests/test_train.py); the
speed it and MLflow show."""

import io
import sys
from types import SimpleNamespace

import pytest
import torch

from pope_lm import monitoring
from pope_lm.monitoring import SpeedMonitor, StepProgressBar, StepProgressLines, progress_display


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stdout", "display"), [(Terminal(), StepProgressBar), (io.StringIO(), StepProgressLines)])
def test_the_progress_display_is_a_bar_on_a_terminal_and_lines_in_a_file(stdout, display, monkeypatch):
    monkeypatch.setattr(sys, "stdout", stdout)
    shown = progress_display(refresh_rate=10)
    assert type(shown) is display and shown.refresh_rate == 10


def test_tokens_per_second_leave_out_the_time_validations_take(monkeypatch):
    clock = iter([0.0, 1.0, 11.0, 12.0])  # step 1 (the window opens), a validation of 10 s after step 2, step 3
    monkeypatch.setattr(monitoring.time, "perf_counter", lambda: next(clock))
    logged = {}
    monkeypatch.setattr(monitoring, "log_host_value", lambda module, name, value, **_: logged.update({name: value}))
    monitor = SpeedMonitor(tokens_per_step=1000, flops_per_token=1.0, peak=None, log_every=2)
    trainer, module = SimpleNamespace(global_step=0, world_size=1), SimpleNamespace(device=torch.device("cpu"))
    for step, hook in [(1, "batch"), (2, "batch"), (2, "validation_start"), (2, "validation_end"), (3, "batch")]:
        trainer.global_step = step
        if hook == "batch":
            monitor.on_train_batch_end(trainer, module)
        else:
            getattr(monitor, f"on_{hook}")(trainer, module)
    assert logged == {"tokens_per_s": 2 * 1000 / (12.0 - 10.0)}  # steps 2 and 3 in 2 s of training
