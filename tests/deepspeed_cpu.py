"""DeepSpeed on CPU for the test scripts (imported first by each): no JIT build of its shared-memory collectives.

On a CPU accelerator DeepSpeed compiles a shared-memory communication op when it starts (about 35 s on 2 cores,
into ~/.cache/torch_extensions, where a build killed midway leaves a lock that stalls the next one). Without
it, DeepSpeed runs the same collectives through torch.distributed (gloo); on GPUs it never builds this op.
"""

import importlib

# By module name: the attribute deepspeed.comm.torch is the torch package, which deepspeed.comm imports.
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
