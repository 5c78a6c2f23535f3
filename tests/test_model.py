"""The GPT model: shapes, tied head, padded vocabulary, KV-cache decoding, FLOP count."""

import pytest
import torch

from pope_lm.config import ModelConfig
from pope_lm.model import GPT, padded_vocab_size


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=100, n_layer=2, d_model=32, n_head=4, head_dim=8)
    return ModelConfig(**{**base, **overrides})


def test_vocabulary_is_padded_to_a_multiple_of_64():
    assert padded_vocab_size(50257) == 50304
    assert GPT(small_config()).embedding.num_embeddings == 128


def test_output_head_is_tied_to_the_embedding():
    model = GPT(small_config())
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n for n in names)
    x = torch.randn(1, 3, 32)
    torch.testing.assert_close(model.head(x), model.final_norm(x) @ model.embedding.weight.T)


@pytest.mark.parametrize("position", ["pope", "rope", "none"])
def test_cached_decoding_equals_full_forward(position):
    torch.manual_seed(0)
    model = GPT(small_config(position=position, delta_init="uniform")).double().eval()
    idx = torch.randint(0, 100, (2, 9))
    full = model(idx)[..., :100]
    logits, caches = model.forward_with_cache(idx[:, :5])
    steps = [logits]
    for t in range(5, 9):
        logits, caches = model.forward_with_cache(idx[:, t : t + 1], caches)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_loss_at_init_is_near_uniform_over_the_vocabulary():
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = torch.randint(0, 100, (4, 16))
    loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.3


def test_pope_attention_flops_exceed_rope_by_the_wider_qk_product():
    pope, rope = GPT(small_config(position="pope")), GPT(small_config(position="rope"))
    extra = pope.flops_per_token(1024) - rope.flops_per_token(1024)
    n_layer, n_head, head_dim = 2, 4, 8
    # Q K^T over 2D instead of D: 2 T D more per head and layer in forward, times 3 for forward + backward.
    assert extra == 3 * n_layer * n_head * 2 * 1024 * head_dim + 6 * (pope.num_parameters() - rope.num_parameters())


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = GPT(small_config(dropout=0.1, activation_checkpointing=checkpointed))
        torch.manual_seed(1)  # the same dropout masks; the recomputation replays them
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = grads
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    for plain, ckpt in zip(grads_plain, grads_ckpt, strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-7)


def _block_input_dtypes_and_loss(model: GPT, idx: torch.Tensor) -> tuple[set[torch.dtype], float]:
    dtypes = set()
    hooks = [block.register_forward_pre_hook(lambda _, args: dtypes.add(args[0].dtype)) for block in model.blocks]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx[:, :-1], idx[:, 1:])
    for hook in hooks:
        hook.remove()
    return dtypes, loss.item()


def test_residual_stream_is_bf16_under_autocast_unless_fp32_residual_is_on(recwarn):
    idx = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    fp32_dtypes, fp32_loss = _block_input_dtypes_and_loss(GPT(small_config(fp32_residual=True)), idx)
    torch.manual_seed(0)
    bf16_dtypes, bf16_loss = _block_input_dtypes_and_loss(GPT(small_config()), idx)
    assert fp32_dtypes == {torch.float32}
    assert bf16_dtypes == {torch.bfloat16}
    assert bf16_loss == pytest.approx(fp32_loss, rel=1e-2)
    # the norms take the bf16 stream in fp32: torch's fused RMSNorm does not fall back (and warn) for the mixed dtypes
    assert not [w for w in recwarn if "fused implementation" in str(w.message)]


def test_norms_of_a_bf16_model_run_in_bf16_without_falling_back(recwarn):
    model = GPT(small_config()).to(torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    assert model.final_norm(x).dtype == torch.bfloat16
    model(torch.randint(0, 100, (2, 5)))
    assert not [w for w in recwarn if "fused implementation" in str(w.message)]


def test_fp32_residual_changes_nothing_without_autocast():
    idx = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for fp32_residual in (True, False):
        torch.manual_seed(0)
        losses.append(GPT(small_config(fp32_residual=fp32_residual))(idx[:, :-1], idx[:, 1:]))
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)


@pytest.mark.parametrize("position", ["pope", "rope"])
def test_max_attention_logits_is_the_largest_causal_logit_of_each_layer(position):
    torch.manual_seed(0)
    model = GPT(small_config(position=position, delta_init="uniform")).double().eval()
    idx = torch.randint(0, 100, (2, 9))
    # By hand: each block's q, k from its normed input, all logits at once, future keys masked out.
    expected, x = [], model.embedding(idx)
    for block in model.blocks:
        q, k, _ = block.attn.project(block.attn_norm(x))
        logits = block.attn.position.scores(q, k)
        future = torch.ones(9, 9, dtype=torch.bool).triu(1)
        expected.append(logits.masked_fill(future, -torch.inf).amax())
        x, _ = block(x)
    torch.testing.assert_close(model.max_attention_logits(idx), torch.stack(expected))
    # scored 4 query rows at a time, the same maximum
    block = model.blocks[1]
    x1 = block.attn_norm(model.blocks[0](model.embedding(idx))[0])
    torch.testing.assert_close(block.attn.max_logit(x1, rows=4), expected[1])


def test_max_attention_logits_ignores_logits_of_future_keys():
    # Token 1's query and token 2's key both lie along one direction, every other q, k is zero: the one nonzero
    # logit pairs the query at position 0 with a key after it, which causal attention never sees.
    model = GPT(small_config(position="none", n_layer=1)).double().eval()
    with torch.no_grad():
        model.embedding.weight.zero_()
        model.embedding.weight[1, 0] = model.embedding.weight[2, 1] = 1.0
        qkv = model.blocks[0].attn.qkv.weight
        qkv.zero_()
        qkv[0, 0] = qkv[32, 1] = 1.0  # q[head 0, dim 0] = x_0, k[head 0, dim 0] = x_1
    idx = torch.tensor([[1, 2, 2, 2]])
    q, k, _ = model.blocks[0].attn.project(model.blocks[0].attn_norm(model.embedding(idx)))
    assert model.blocks[0].attn.position.scores(q, k)[0, 0, 0, 1] > 1.0
    torch.testing.assert_close(model.max_attention_logits(idx), torch.zeros(1, dtype=torch.float64))
