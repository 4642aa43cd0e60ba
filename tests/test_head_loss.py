"""The fused head + softcap + cross-entropy equals the plain PyTorch ops it replaces: loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.models.components import GPT, GPTConfig, head_loss
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


def chunk_bytes(rows, vocab=300):
    return 4 * vocab * rows


@pytest.mark.parametrize("chunk_rows,block_rows", [(8, 3), (16, 1000), (1000, 8)])  # partial last chunk / block
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_plain_ops_fp32(reduction, chunk_rows, block_rows, monkeypatch):
    monkeypatch.setattr(head_loss, "BLOCK_BYTES", chunk_bytes(block_rows))
    h, w, targets = inputs()
    upstream = torch.randn(len(targets)) if reduction == "none" else None
    fn = lambda *a: softcap_cross_entropy(*a, chunk_bytes=chunk_bytes(chunk_rows))  # noqa: E731
    ours = loss_and_grads(fn, h, w, targets, reduction, upstream)
    ref = loss_and_grads(reference, h, w, targets, reduction, upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert torch.all(ours[0][targets == -1] == 0)


def assert_close_bf16(ours, ref):
    """bf16 matmuls on both sides, rounded at different points: losses to 1e-2 relative, gradients to 2 % of
    their largest entry (measured: 0.4 %)."""
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-2, atol=1e-3)
    for a, b in zip(ours[1:], ref[1:]):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bf16_autocast_matches_plain_ops(reduction):
    h, w, targets = inputs(n=24, d=32, vocab=128)
    upstream = torch.randn(len(targets)) if reduction == "none" else None
    fn = lambda *a: softcap_cross_entropy(*a, chunk_bytes=chunk_bytes(10, 128))  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(fn, h, w, targets, reduction, upstream)
        ref = loss_and_grads(reference, h, w, targets, reduction, upstream)
    assert_close_bf16(ours, ref)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_traced_op_matches_plain_ops(reduction, precision, monkeypatch):
    """The GPU path: under torch.compile the op is traced as plain ops (rows_traced), chunk by chunk, in one graph
    (fullgraph): same numbers. Checked here on CPU by lifting the CPU's eager rule."""
    monkeypatch.setattr(head_loss, "EAGER_DEVICES", set())
    h, w, targets = inputs(n=40, d=32, vocab=256)
    upstream = torch.randn(len(targets)) if reduction == "none" else None
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: softcap_cross_entropy(*a, chunk_bytes=chunk_bytes(16, 256)), fullgraph=True)
    bf16 = precision == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ours = loss_and_grads(fn, h, w, targets, reduction, upstream)
        ref = loss_and_grads(reference, h, w, targets, reduction, upstream)
    if bf16:
        assert_close_bf16(ours, ref)
    else:
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_gpt_on_cpu_runs_the_op_eagerly(precision):
    """On a CPU a compiled GPT breaks its graph at the op, which runs eagerly: loss and gradients as uncompiled."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, sequence_len=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    idx, targets = torch.randint(0, 512, (3, 32)), torch.randint(0, 512, (3, 32))
    results = []
    torch._dynamo.reset()
    counters.clear()
    for forward in (model, torch.compile(model, dynamic=False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(idx, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    assert sum(counters["graph_break"].values()) >= 1  # the break at the op
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(compiled_loss, eager_loss, **tol)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, **tol)


def test_kept_logits_buffer_serves_calls_of_any_size():
    """Eager CPU chunks reuse one logits buffer: a smaller call after a larger one, and a larger one after that."""
    for n, vocab in [(37, 300), (5, 300), (37, 64), (60, 300)]:
        h, w, targets = inputs(n=n, vocab=vocab)
        ours = loss_and_grads(softcap_cross_entropy, h, w, targets, "mean")
        ref = loss_and_grads(reference, h, w, targets, "mean")
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert head_loss._workspace.buf.numel() == 60 * 300


def test_no_grad_saves_nothing_and_gives_the_loss():
    h, w, targets = inputs()
    with torch.no_grad():
        loss = softcap_cross_entropy(h.requires_grad_(), w, targets, 15.0)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference(h.detach(), w, targets, 15.0, "mean"), rtol=1e-6, atol=1e-6)


def test_all_targets_ignored_gives_nan_like_cross_entropy():
    h, w, targets = inputs()
    targets[:] = -1
    assert torch.isnan(softcap_cross_entropy(h, w, targets, 15.0)) and torch.isnan(
        reference(h, w, targets, 15.0, "mean")
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_gives_the_same_gradients_twice(reduction):
    h, w, targets = inputs()
    h.requires_grad_()
    loss = softcap_cross_entropy(h, w, targets, 15.0, reduction).sum()
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


def test_bad_reduction_is_named():
    h, w, targets = inputs()
    with pytest.raises(ValueError, match="'avg'"):
        softcap_cross_entropy(h, w, targets, 15.0, "avg")
    with pytest.raises(ValueError, match="softcap"):
        softcap_cross_entropy(h, w, targets, 100.0)


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
