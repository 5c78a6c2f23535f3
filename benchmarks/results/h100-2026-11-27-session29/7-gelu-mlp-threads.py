"""gelu_mlp from four fresh Python threads against torch's MLP, on a CUDA GPU (session 29, call 7; README there).

    python3 7-gelu-mlp-threads.py MODE    MODE: plain, warm, setdev, sync, ctxmgr, cudart, or joined by '-'
"""

import ctypes
import sys
import threading

import torch
import torch.nn.functional as F

from pope_lm.kernels.gelu_mlp import _loaded_library, gelu_mlp

torch.manual_seed(0)
x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
up = (torch.randn(3072, 768, device="cuda") * 0.02).bfloat16()
down = (torch.randn(768, 3072, device="cuda") * 0.02).bfloat16()
ref = F.linear(F.gelu(F.linear(x, up), approximate="tanh"), down)
mode = sys.argv[1]
if "warm" in mode:  # the plan of the threads' shape cached by the main thread
    gelu_mlp(x[:1024], up, down)
outs, errors = [None] * 4, []


def run(i: int) -> None:
    rows = x[i * 1024:(i + 1) * 1024]
    try:
        if "setdev" in mode:
            torch.cuda.set_device(0)
        if "sync" in mode:
            torch.cuda.synchronize()
        if "cudart" in mode:
            _loaded_library("libcudart").cudaFree(ctypes.c_void_p(None))
        if "ctxmgr" in mode:
            with torch.cuda.device(0):
                outs[i] = gelu_mlp(rows, up, down)
        else:
            outs[i] = gelu_mlp(rows, up, down)
    except Exception as error:  # a thread's exception would otherwise pass unseen
        errors.append(repr(error)[:80])


threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
torch.cuda.synchronize()
relative = None if errors else ((torch.cat(outs) - ref).float().norm() / ref.float().norm()).item()
print(mode, "errors", errors, "rel err", relative, flush=True)
