"""pope_lm.data: tokenizers, sharded token datasets (`pope-lm prepare`) and the streaming DataModule.

`TokenDataModule` is imported on first use: it pulls in torch and Lightning, which `pope-lm prepare` and
the prepare worker processes do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DataError

if TYPE_CHECKING:
    from .datamodule import TokenDataModule

__all__ = ["DataError", "TokenDataModule"]


def __getattr__(name: str) -> Any:
    if name == "TokenDataModule":
        from .datamodule import TokenDataModule

        return TokenDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
