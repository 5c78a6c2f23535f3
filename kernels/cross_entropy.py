"""The language model's loss, cross-entropy of the head's logits x W^T, without a second logits-sized tensor.

The logits (N tokens x V vocabulary: 1.6 GB in bf16 at 16 x 1024 tokens and GPT-2's padded 50,304) are the largest
tensor of a GPT-2-size step. Compiled `F.cross_entropy(logits.float(), targets)` reads them in the forward (for the
log-sum-exp) and again in the backward, where it writes a gradient of the same size. Here one kernel, a program per
row, computes the row's loss and overwrites the logits with the loss's gradient in place (its second pass over the
row finds it partly in L2),

    G[i, j] = softmax(logits_i)_j - [j == target_i]      (0 for a row whose target is ignore_index),

unscaled: the backward's scale s_i = dL / dloss_i (1 / scored rows for the mean) is known only then, and it
commutes with both products, so it lands on their small results instead of on G:

    dx = diag(s) G W = s * (G W),        dW = G^T diag(s) x = G^T (s * x).

What the backward then reads is G itself; no second (N, V) tensor is allocated, and the separate softmax pass of
the backward is gone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_BLOCK = 16384  # vocabulary entries per chunk: 4 per GPT-2 row; 32 fp32 values per thread at 16 warps
_NUM_WARPS = 16  # 16384 x 16 best of 2048..16384 x 4..32 on an H100 (benchmarks/cross_entropy_results.md)


@triton.jit
def _loss_kernel(Logits, Targets, Losses, stride_row, n_cols, ignore_index,
                 WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row i: Losses[i] = logsumexp(logits_i) - logits_i[target] (0 if ignored, NaN if the target is not a column);
    with WRITE_GRAD, logits_i becomes its gradient G_i in place."""
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    target = tl.load(Targets + row).to(tl.int32)
    cols = tl.arange(0, BLOCK)
    # pass 1: the running maximum and the sum of exponentials below it, chunk by chunk (fp32, base 2)
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32) * _LOG2E
        m_new = tl.maximum(m, tl.max(x, 0))  # finite: every chunk holds at least one column
        total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), 0)
        m = m_new
    lse2 = m + tl.log2(total)  # log2 of the sum of exp(logits)
    scored = target != ignore_index
    valid = (target >= 0) & (target < n_cols)
    picked = tl.load(base + target, mask=scored & valid, other=0.0).to(tl.float32)
    loss = tl.where(scored, lse2 * _LN2 - picked, 0.0)
    # a target outside the vocabulary would read another row's memory: its loss is NaN, which the mean then shows
    tl.store(Losses + row, tl.where(scored & ~valid, float("nan"), loss))
    if WRITE_GRAD:  # pass 2, on the same row (partly still in L2): softmax - onehot, in the logits' dtype
        for start in range(0, n_cols, BLOCK):
            ok = start + cols < n_cols
            x = tl.load(base + start + cols, mask=ok, other=0.0).to(tl.float32) * _LOG2E
            grad = tl.exp2(x - lse2) - tl.where(start + cols == target, 1.0, 0.0)
            grad = tl.where(scored, grad, 0.0)
            tl.store(base + start + cols, grad.to(Logits.dtype.element_ty), mask=ok)


def _losses_and_gradient(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = x @ weight.t()
    losses = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    if x.shape[0]:
        _loss_kernel[(x.shape[0],)](logits, targets, losses, logits.stride(0), logits.shape[1], ignore_index,
                                    WRITE_GRAD=write_grad, BLOCK=min(_BLOCK, triton.next_power_of_2(logits.shape[1])),
                                    num_warps=_NUM_WARPS)
    return losses, logits


# A custom op: opaque to torch.compile (no graph break), differentiable through autograd. Its second output is the
# logits' buffer, holding G where write_grad (else the logits); saved for the backward, not differentiable.
@torch.library.custom_op("pope_lm::linear_cross_entropy", mutates_args=())
def _loss_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
             write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _losses_and_gradient(x, weight, targets, ignore_index, write_grad)


@_loss_op.register_fake
def _loss_fake(x, weight, targets, ignore_index, write_grad):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, _, ctx.write_grad = inputs
    _, grad_logits = output
    ctx.mark_non_differentiable(grad_logits)
    ctx.set_materialize_grads(False)  # else autograd hands the backward a zero-filled (N, V) "gradient" of G
    ctx.save_for_backward(x, weight, grad_logits)


def _backward(ctx, grad_losses, _grad_logits):
    if not ctx.write_grad:
        raise RuntimeError("linear_cross_entropy is differentiated, but ran with write_grad=False: no gradient kept")
    x, weight, grad_logits = ctx.saved_tensors
    scale = grad_losses[:, None]
    dx = ((grad_logits @ weight) * scale).to(x.dtype)
    dweight = grad_logits.t() @ (x * scale).to(x.dtype)
    return dx, dweight, None, None, None


_loss_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                         fused: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits x W^T against targets over the rows whose target is not ignore_index: the
    value of `F.cross_entropy(F.linear(x, weight).float().flatten(0, -2), targets.flatten(), ignore_index=...)`.

    x: (..., d), weight: (V, d), targets: x's leading shape, int64. fused (default: on CUDA) runs the Triton kernel
    above, in the autocast dtype where autocast is on (as F.linear would); otherwise the plain torch expression.
    Fused runs need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
    """
    x = x.flatten(0, -2)
    targets = targets.flatten()
    if x.shape[0] != targets.shape[0] or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)}, weight {tuple(weight.shape)} and targets "
                         f"{tuple(targets.shape)} do not match")
    if not (x.is_cuda if fused is None else fused):
        return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    write_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    losses, _ = _loss_op(x.to(dtype), weight.to(dtype), targets, ignore_index, write_grad)
    return losses.sum() / (targets != ignore_index).sum()
