"""`pope-lm train` with trainer.strategy=deepspeed on CPU, for tests only: torchrun tests/lightning_deepspeed_cpu.py
train RECIPE [key=value ...].

Lightning's DeepSpeedStrategy refuses anything but CUDA, and so does `pope_lm.strategy.build_strategy`. DeepSpeed
itself trains on CPU (gloo, its CPU accelerator), so three CUDA-only spots are patched here and nothing else:
the strategy's accelerator check, its device-index check (CPU devices have no index) and the device rank Lightning
passes to deepspeed.initialize (the index, None on CPU; -1 lets DeepSpeed use LOCAL_RANK). Everything else is
the production path: DeepSpeedLitGPT, the generated DeepSpeed config, ZeRO checkpoint directories, resume=auto.
"""

from __future__ import annotations

import sys
from typing import Any

import deepspeed
import deepspeed_cpu  # noqa: F401
import lightning.pytorch.strategies.deepspeed as lightning_deepspeed
from lightning.pytorch.strategies import DDPStrategy

import pope_lm.train
from pope_lm.cli import main
from pope_lm.config import RunConfig
from pope_lm.strategy import build_strategy

_initialize = deepspeed.initialize


def _initialize_on_cpu(*args: Any, **kwargs: Any) -> Any:
    kwargs["args"].device_rank = -1  # Lightning always passes args=Namespace(device_rank=<device index>)
    return _initialize(*args, **kwargs)


def _build_strategy_on_cpu(cfg: RunConfig, accelerator: str, precision: str) -> Any:
    return build_strategy(cfg, "gpu", precision)


lightning_deepspeed.DeepSpeedStrategy.setup_environment = DDPStrategy.setup_environment  # type: ignore[method-assign]
lightning_deepspeed._validate_device_index_selection = lambda devices: None
deepspeed.initialize = _initialize_on_cpu
pope_lm.train.build_strategy = _build_strategy_on_cpu  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
