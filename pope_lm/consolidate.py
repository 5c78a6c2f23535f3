"""`pope-lm consolidate CKPT OUT`: a checkpoint's model weights as one fp32 safetensors file.

CKPT is either form `pope-lm train` writes: a native `.ckpt` file, or the directory of ZeRO shards written under
DeepSpeed (gathered by DeepSpeed's zero_to_fp32). The tensor names are those of `pope_lm.model.GPT`, so
`GPT(cfg.model).load_state_dict(safetensors.torch.load_file(OUT))` restores the model; the run's config travels
in the file's metadata (key `pope_lm_config`, JSON) to rebuild `cfg`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from pope_lm.checkpointing import load_model
from pope_lm.config import config_to_container
from pope_lm.lit_module import CONFIG_KEY


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the weights of `checkpoint` to `out` (fp32, atomically: a temporary name, then rename)."""
    model, cfg = load_model(checkpoint)
    tensors = {name: (t.float() if t.is_floating_point() else t).contiguous()
               for name, t in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(config_to_container(cfg))})
    os.replace(tmp, out)
    return out
