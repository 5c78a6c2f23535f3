"""The progress display: a tqdm bar on a terminal, lines elsewhere (the lines themselves: tests/test_train.py)."""

import io
import sys

import pytest

from pope_lm.monitoring import StepProgressBar, StepProgressLines, progress_display


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stdout", "display"), [(Terminal(), StepProgressBar), (io.StringIO(), StepProgressLines)])
def test_the_progress_display_is_a_bar_on_a_terminal_and_lines_in_a_file(stdout, display, monkeypatch):
    monkeypatch.setattr(sys, "stdout", stdout)
    shown = progress_display(refresh_rate=10)
    assert type(shown) is display and shown.refresh_rate == 10
