"""hopper_check.check_compiled_graphs on this checkout's kernels, or on another revision's (argv[1])."""
import math
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import hopper_check as hc
import torch._inductor.config

torch._inductor.config.triton.cudagraph_trees_history_recording = True

if len(sys.argv) > 1:
    def from_revision(listed):
        module = hc.load_revision(Path(sys.argv[1]))
        module.KEYS_IN_L2, module.LISTED_GAIN = 0.0, -math.inf
        return module
    hc.head_major_order = from_revision
hc.check_compiled_graphs()
