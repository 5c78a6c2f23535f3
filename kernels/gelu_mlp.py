"""The MLP y = gelu(x W1^T) W2^T with GELU inside cuBLASLt's matmul epilogues.

Compiled, a pope-lm MLP runs cuBLAS for the matmuls and inductor kernels for GELU between them:

    forward:   h = x W1^T         g = gelu(h)                   y = g W2^T
    backward:  dg = dy W2         dh = dg * gelu'(h) (and g again, for dW2 = dy^T g)

and the two elementwise kernels make six passes over (tokens x 4d) tensors in HBM (forward: read h, write g;
backward: read dg and h, write dh and g): 2.3 ms of a 124M step on an H100 (`benchmarks/train_throughput_results.md`,
session 22). cuBLASLt applies GELU in the matmul's epilogue, where the tile is still in registers:

    forward:   GELU_AUX epilogue: one matmul writes g and, as its auxiliary output, h
    backward:  DGELU epilogue: the matmul dy W2 reads h and writes dh = (dy W2) * gelu'(h) directly

so only the matmuls remain, each moving one (tokens x 4d) tensor more than a plain one. The backward keeps g from the
forward instead of recomputing it (one more (tokens x 4d) tensor of activation memory per layer). Session 22 tried the
same fusion in plain Triton matmuls, which ran at half cuBLAS's speed and lost; here the matmuls are cuBLAS's own.

cuBLASLt's GELU is the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's own activation
(`model.activation: gelu_tanh`). On devices other than CUDA, for dtypes other than bf16 and fp16, and for widths that
are not multiples of 8, the same function runs in plain torch. cuBLASLt is reached through ctypes, in the library
torch itself loaded.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

import torch
import torch.nn.functional as F

log = logging.getLogger("pope_lm")
# cuBLASLt's enums (cublasLt.h, library_types.h, cublas_api.h).
_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_R_32F = 0  # cudaDataType_t
_DATA_TYPES = {torch.float16: 2, torch.bfloat16: 14}
_OP_N = 0  # cublasOperation_t
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_AUX_POINTER, _DESC_AUX_LD = 3, 4, 7, 11, 12
_EPILOGUE_GELU_AUX, _EPILOGUE_DGELU = 160, 192
_PREF_MAX_WORKSPACE_BYTES = 1
_WORKSPACE_BYTES = 32 * 2**20
# cuBLASLt's heuristics assume 16-byte-aligned operands; the caching allocator gives 512-byte-aligned blocks.
_ALIGNMENT = 16
# A plan's descriptor is shared by every call of its shape, and each call sets its own auxiliary pointer on it before
# the launch: held from that setting until cuBLASLt has read it (the launch is enqueued), so that two threads (the
# autograd engine's and the caller's, say) cannot launch with each other's.
_DESCRIPTOR_LOCK = threading.Lock()


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _loaded_library(prefix: str) -> ctypes.CDLL:
    """The shared library whose file name starts with prefix that this process already loaded (torch's own cuBLASLt
    and CUDA runtime, whatever their version), else the plain name."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if path.rsplit("/", 1)[-1].startswith(prefix):
                return ctypes.CDLL(path)
    return ctypes.CDLL(f"{prefix}.so")


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt: {call} failed with status {status}")


_P, _INT, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
# The functions called through ctypes, by library: their argument types (each returns a status, 0 for success).
_LT_PROTOTYPES = {
    "cublasLtCreate": [_P],
    "cublasLtMatmulDescCreate": [_P, _INT, _INT],
    "cublasLtMatmulDescSetAttribute": [_P, _INT, _P, _SIZE],
    "cublasLtMatrixLayoutCreate": [_P, _INT, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatmulPreferenceCreate": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _INT, _P, _SIZE],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _INT, _P, _P],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _SIZE, _P],
}
_CUDART_PROTOTYPES = {"cudaMalloc": [_P, _SIZE], "cudaFree": [_P]}


def _with_prototypes(library: ctypes.CDLL, prototypes: dict[str, list]) -> ctypes.CDLL:
    for name, argtypes in prototypes.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return library


@functools.cache
def _lt() -> ctypes.CDLL:
    torch.cuda.init()  # loads torch's CUDA libraries, cuBLASLt among them
    return _with_prototypes(_loaded_library("libcublasLt"), _LT_PROTOTYPES)


@functools.cache
def _cudart() -> ctypes.CDLL:
    return _with_prototypes(_loaded_library("libcudart"), _CUDART_PROTOTYPES)


_THREAD = threading.local()


def _make_context_current() -> None:
    """Make the current device's CUDA context current on this thread, once per thread.

    cuBLASLt launches into the calling thread's current context, and a thread has one only after its first CUDA runtime
    call. torch's tensor methods do not always make that call: a fresh thread that only slices tensors and allocates
    from the caching allocator has none. There cublasLtMatmul failed with status 13 (session 29, on an H100).
    cudaFree(NULL) is CUDA's way to make the context current without doing anything else."""
    if not getattr(_THREAD, "context_current", False):
        _check(_cudart().cudaFree(None), "cudaFree(NULL)")
        _THREAD.context_current = True


@functools.cache
def _handle_and_workspace(device_index: int) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
    """A cuBLASLt handle and a workspace for one device, for the life of the process. Every call on the device uses
    this workspace: calls on one stream run in order, but calls on two streams at once would share it (training and
    sampling use the current stream).

    The workspace comes from cudaMalloc, not from torch's allocator: under CUDA graphs (compile mode reduce-overhead)
    the first call runs during the graphs' warm-up, whose allocations belong to the graphs' private memory pool."""
    with torch.cuda.device(device_index):
        handle = ctypes.c_void_p()
        _check(_lt().cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        workspace = ctypes.c_void_p()
        _check(_cudart().cudaMalloc(ctypes.byref(workspace), _WORKSPACE_BYTES), "cudaMalloc of the workspace")
    return handle, workspace


@functools.cache
def _plan(device_index: int, dtype: torch.dtype, rows: int, cols: int, inner: int, transpose_a: int,
          epilogue: int) -> tuple[ctypes.c_void_p, tuple[ctypes.c_void_p, ...], _HeuristicResult] | None:
    """The matmul descriptor, the layouts of A, B and D, and cuBLASLt's best algorithm for the column-major product
    D (rows x cols) = op(A) B, B (inner x cols), with the epilogue's auxiliary matrix laid out as D; None where
    cuBLASLt has no algorithm for it (said once per shape)."""
    lt, (handle, _) = _lt(), _handle_and_workspace(device_index)
    desc = ctypes.c_void_p()
    _check(lt.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "cublasLtMatmulDescCreate")
    for attribute, value in ((_DESC_TRANSA, ctypes.c_int32(transpose_a)), (_DESC_TRANSB, ctypes.c_int32(_OP_N)),
                             (_DESC_EPILOGUE, ctypes.c_uint32(epilogue)), (_DESC_AUX_LD, ctypes.c_int64(rows))):
        _check(lt.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(value), ctypes.sizeof(value)),
               f"cublasLtMatmulDescSetAttribute({attribute})")
    # A is stored (inner x rows) when transposed, (rows x inner) when not; column-major, leading dimension its rows.
    a_rows, a_cols = (inner, rows) if transpose_a else (rows, inner)
    layouts = []
    for n_rows, n_cols in ((a_rows, a_cols), (inner, cols), (rows, cols)):
        layout = ctypes.c_void_p()
        _check(lt.cublasLtMatrixLayoutCreate(ctypes.byref(layout), _DATA_TYPES[dtype], ctypes.c_uint64(n_rows),
                                             ctypes.c_uint64(n_cols), ctypes.c_int64(n_rows)),
               "cublasLtMatrixLayoutCreate")
        layouts.append(layout)
    preference = ctypes.c_void_p()
    _check(lt.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "cublasLtMatmulPreferenceCreate")
    size = ctypes.c_uint64(_WORKSPACE_BYTES)
    _check(lt.cublasLtMatmulPreferenceSetAttribute(preference, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size),
                                                   ctypes.sizeof(size)), "cublasLtMatmulPreferenceSetAttribute")
    result, found = _HeuristicResult(), ctypes.c_int(0)
    a, b, d = layouts
    # The aux pointer is set per call; the heuristic reads only its alignment, so give it an aligned placeholder.
    aux = ctypes.c_void_p(2**20)
    _check(lt.cublasLtMatmulDescSetAttribute(desc, _DESC_AUX_POINTER, ctypes.byref(aux), ctypes.sizeof(aux)),
           "cublasLtMatmulDescSetAttribute(aux)")
    _check(lt.cublasLtMatmulAlgoGetHeuristic(handle, desc, a, b, d, d, preference, 1, ctypes.byref(result),
                                             ctypes.byref(found)), "cublasLtMatmulAlgoGetHeuristic")
    lt.cublasLtMatmulPreferenceDestroy(preference)
    if found.value == 0:
        log.warning("cuBLASLt has no algorithm for a %dx%dx%d %s matmul with epilogue %d on this GPU; the MLP computes "
                    "GELU in torch there (slower, the same function)", rows, cols, inner, dtype, epilogue)
        return None
    return desc, (a, b, d), result


def _matmul(a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor, out: torch.Tensor, *, transpose_a: bool,
            epilogue: int) -> bool:
    """Column-major out (rows x cols) = op(a) b with the epilogue reading or writing aux, all contiguous; False if
    cuBLASLt has no algorithm for it."""
    for tensor in (a, b, aux, out):
        if not tensor.is_contiguous() or tensor.data_ptr() % _ALIGNMENT:
            raise ValueError("gelu_mlp: cuBLASLt needs contiguous, 16-byte-aligned operands")
    cols, rows = out.shape  # row-major (cols x rows) is column-major (rows x cols)
    inner = b.shape[1]
    index = out.device.index if out.device.index is not None else torch.cuda.current_device()
    plan = _plan(index, out.dtype, rows, cols, inner, int(transpose_a), epilogue)
    if plan is None:
        return False
    desc, (a_layout, b_layout, d_layout), result = plan
    lt, (handle, workspace) = _lt(), _handle_and_workspace(index)
    pointer = ctypes.c_void_p(aux.data_ptr())
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    d = ctypes.c_void_p(out.data_ptr())
    stream = ctypes.c_void_p(torch.cuda.current_stream(out.device).cuda_stream)
    _make_context_current()
    with _DESCRIPTOR_LOCK:
        _check(lt.cublasLtMatmulDescSetAttribute(desc, _DESC_AUX_POINTER, ctypes.byref(pointer),
                                                 ctypes.sizeof(pointer)), "cublasLtMatmulDescSetAttribute(aux)")
        _check(lt.cublasLtMatmul(handle, desc, ctypes.byref(one), ctypes.c_void_p(a.data_ptr()), a_layout,
                                 ctypes.c_void_p(b.data_ptr()), b_layout, ctypes.byref(zero), d, d_layout, d, d_layout,
                                 ctypes.byref(result.algo), workspace, ctypes.c_size_t(_WORKSPACE_BYTES), stream),
               "cublasLtMatmul")
    return True


def fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether cuBLASLt may run the product of x and weight: CUDA tensors (not ROCm's) in bf16 or fp16, the weight's
    sides multiples of 8 (rows of 16 bytes, the alignment that cuBLASLt's kernels and the epilogue's auxiliary matrix
    need)."""
    return (x.is_cuda and torch.version.cuda is not None and x.dtype in _DATA_TYPES and weight.shape[0] % 8 == 0
            and weight.shape[1] % 8 == 0)


# Row-major (tokens x features) is column-major (features x tokens), so each product below is the transposed one.
def linear_gelu(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g = gelu(h) and h = x W^T: x (M, K), W (N, K); g and h (M, N)."""
    if fused(x, weight):
        g, h = (x.new_empty(x.shape[0], weight.shape[0]) for _ in range(2))
        if _matmul(weight, x, h, g, transpose_a=True, epilogue=_EPILOGUE_GELU_AUX):  # g^T = gelu(W x^T), aux h^T
            return g, h
    h = x @ weight.t()
    return F.gelu(h, approximate="tanh"), h


# A custom op, because the backward below, which calls it, is traced by torch.compile.
@torch.library.custom_op("pope_lm::matmul_dgelu", mutates_args=())
def matmul_dgelu(dy: torch.Tensor, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dh = (dy W) * gelu'(h): dy (M, K), W (K, N), h (M, N)."""
    if fused(dy, weight):
        dh = torch.empty_like(h)
        if _matmul(weight, dy, h, dh, transpose_a=False, epilogue=_EPILOGUE_DGELU):  # dh^T = (W^T dy^T) * gelu'(h^T)
            return dh
    return torch.ops.aten.gelu_backward(dy @ weight, h, approximate="tanh")


@matmul_dgelu.register_fake
def _matmul_dgelu_fake(dy, weight, h):
    return torch.empty_like(h)


@torch.library.custom_op("pope_lm::gelu_mlp", mutates_args=())
def _gelu_mlp(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """y = gelu(x up^T) down^T, and g = gelu(x up^T) and h = x up^T for the backward."""
    g, h = linear_gelu(x, up)
    return g @ down.t(), g, h


@_gelu_mlp.register_fake
def _gelu_mlp_fake(x, up, down):
    hidden = x.new_empty(x.shape[0], up.shape[0])
    return x.new_empty(x.shape[0], down.shape[0]), hidden, torch.empty_like(hidden)


def _setup_context(ctx, inputs, output) -> None:
    x, up, down = inputs
    _, g, h = output
    ctx.mark_non_differentiable(g, h)
    ctx.save_for_backward(x, up, down, g, h)


def _backward(ctx, dy, _dg, _dh):
    x, up, down, g, h = ctx.saved_tensors
    dh = matmul_dgelu(dy.contiguous(), down, h)
    return dh @ up, dh.t() @ x, dy.t() @ g


_gelu_mlp.register_autograd(_backward, setup_context=_setup_context)


def gelu_mlp(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """gelu(x up^T) down^T with tanh-approximate GELU: x (..., d), up (hidden, d), down (d, hidden).

    Under autocast the operands run in its dtype, as F.linear's would. CUDA bf16/fp16 operands take cuBLASLt's fused
    epilogues; others the same function in torch."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    y, _, _ = _gelu_mlp(x.flatten(0, -2).to(dtype).contiguous(), up.to(dtype), down.to(dtype))
    return y.view(*x.shape[:-1], down.shape[0])
