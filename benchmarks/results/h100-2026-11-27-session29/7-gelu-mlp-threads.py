import sys, threading, torch, torch.nn.functional as F
from pope_lm.kernels.gelu_mlp import gelu_mlp
torch.manual_seed(0)
x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
up = (torch.randn(3072, 768, device="cuda") * 0.02).bfloat16()
down = (torch.randn(768, 3072, device="cuda") * 0.02).bfloat16()
ref = F.linear(F.gelu(F.linear(x, up), approximate="tanh"), down)
mode = sys.argv[1]
if "warm" in mode:
    gelu_mlp(x[:1024], up, down)
outs, errs = [None] * 4, []
def run(i):
    try:
        if "setdev" in mode:
            torch.cuda.set_device(0)
        if "sync" in mode:
            torch.cuda.synchronize()
        if "ctxmgr" in mode:
            with torch.cuda.device(0):
                outs[i] = gelu_mlp(x[i * 1024:(i + 1) * 1024], up, down)
        elif "cudart" in mode:
            import ctypes
            from pope_lm.kernels.gelu_mlp import _loaded_library
            free = ctypes.c_int()
            _loaded_library("libcudart").cudaFree(None)
            outs[i] = gelu_mlp(x[i * 1024:(i + 1) * 1024], up, down)
        else:
            outs[i] = gelu_mlp(x[i * 1024:(i + 1) * 1024], up, down)
    except Exception as e:
        errs.append(repr(e)[:80])
ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]; torch.cuda.synchronize()
print(mode, "errors", errs, "rel err", ((torch.cat(outs) - ref).float().norm() / ref.float().norm()).item() if not errs else None, flush=True)
