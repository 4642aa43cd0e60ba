"""The fused head + softcap + cross-entropy equals the plain PyTorch ops it replaces: loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.models.components import GPT, GPTConfig
from nanochat.models.components import head_loss
from nanochat.models.components.head_loss import softcap_cross_entropy


def reference(h, w, targets, cap, reduction):
    logits = F.linear(h, w).float()
    logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def inputs(n=37, d=16, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.5  # large enough that the softcap bends the logits
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = -1
    return h, w, targets


def loss_and_grads(fn, h, w, targets, reduction, upstream=None):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, targets, 15.0, reduction)
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("block_rows", [8, 1000])  # 8: the last of 5 blocks is partial; 1000: one block (as on a GPU)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_plain_ops(reduction, block_rows, monkeypatch):
    monkeypatch.setattr(head_loss, "CPU_BLOCK_BYTES", 4 * 300 * block_rows)
    h, w, targets = inputs()
    upstream = torch.randn(len(targets)) if reduction == "none" else None
    ours = loss_and_grads(softcap_cross_entropy, h, w, targets, reduction, upstream)
    ref = loss_and_grads(reference, h, w, targets, reduction, upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert torch.all(ours[0][targets == -1] == 0)


def test_bf16_autocast_matches_plain_ops():
    h, w, targets = inputs(n=24, d=32, vocab=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(softcap_cross_entropy, h, w, targets, "mean")
        ref = loss_and_grads(reference, h, w, targets, "mean")
    assert ours[1].dtype == ref[1].dtype == torch.float32
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_all_targets_ignored_gives_nan_like_cross_entropy():
    h, w, targets = inputs()
    targets[:] = -1
    assert torch.isnan(softcap_cross_entropy(h, w, targets, 15.0)) and torch.isnan(reference(h, w, targets, 15.0, "mean"))


def test_second_backward_is_refused():
    h, w, targets = inputs()
    h.requires_grad_()
    loss = softcap_cross_entropy(h, w, targets, 15.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_bad_reduction_is_named():
    h, w, targets = inputs()
    with pytest.raises(ValueError, match="'avg'"):
        softcap_cross_entropy(h, w, targets, 15.0, "avg")


def test_gpt_loss_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, sequence_len=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # zero at init; make the softcap matter
    idx = torch.randint(0, 512, (3, 32))
    targets = torch.randint(0, 512, (3, 32))
    targets[:, :4] = -1
    loss = model(idx, targets)
    loss.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(idx)
    ref = F.cross_entropy(logits.view(-1, 512), targets.view(-1), ignore_index=-1)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3 * 32,)
    torch.testing.assert_close(per_token.sum() / (targets != -1).sum(), loss.detach(), rtol=1e-6, atol=1e-6)
