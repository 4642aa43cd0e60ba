import io

import pytest
import torch

from nanochat.errors import UserError
from nanochat.models.components import GPT, GPTConfig
from nanochat.optim import MuonAdamW, build_optimizer, lr_multiplier, muon_momentum, newton_schulz
from nanochat.optim.param_groups import check_partition
from nanochat.settings import OptimizerConfig, ScheduleConfig


def tiny_model():
    return GPT(GPTConfig.from_depth(2, vocab_size=128, sequence_len=16))


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_is_close_to_orthogonal(shape, dtype):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = newton_schulz(G, dtype=dtype).float()
    s = torch.linalg.svdvals(X)
    # The quintic trades exactness for speed: singular values land near 1 (roughly 0.7-1.2), not exactly 1.
    assert s.min() > 0.6 and s.max() < 1.25, s
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact orthogonal factor
    cosine = (X * polar).sum() / (X.norm() * polar.norm())
    assert cosine > 0.97


def _muon_pair(shape, ns_dtype):
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(shape))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = MuonAdamW([dict(params=[ours], kind="muon", lr=0.02, momentum=0.95, ns_dtype=ns_dtype)])
    ref_opt = torch.optim.Muon(
        [ref],
        lr=0.02,
        momentum=0.95,
        nesterov=True,
        weight_decay=0.0,
        ns_coefficients=(3.4445, -4.7750, 2.0315),
        ns_steps=5,
        adjust_lr_fn="original",
    )
    updates = []
    for _ in range(6):
        before = ours.detach().clone()
        grad = torch.randn(shape)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
        updates.append((ours.detach() - before, ref.detach() - before))
    return updates


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_groups_agree_with_torch_muon_in_bf16(shape):
    for ours, ref in _muon_pair(shape, "bfloat16"):
        # bf16 Newton-Schulz is itself 3-10% away from fp32, and torch orders (fuses) the operations
        # differently, so the two bf16 results differ by about as much. A wrong lr scale would be 100% off;
        # the exact semantics are pinned by the fp32 test below.
        assert (ours - ref).norm() / ref.norm() < 0.12


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_groups_equal_torch_muon_in_fp32(shape, monkeypatch):
    # torch.optim.Muon hard-codes bf16; run its iteration in fp32 too so the two must agree to rounding.
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.float())
    for ours, ref in _muon_pair(shape, "float32"):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-4)


def test_adamw_groups_agree_with_torch_adamw():
    torch.manual_seed(0)
    shapes = [(100, 16), (16, 100)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt = MuonAdamW(
        [dict(params=[ours[0]], kind="adamw", lr=0.2, **kw), dict(params=[ours[1]], kind="adamw", lr=0.004, **kw)]
    )
    ref_opt = torch.optim.AdamW([dict(params=[refs[0]], lr=0.2), dict(params=[refs[1]], lr=0.004)], **kw)
    for _ in range(10):
        for a, b in zip(ours, refs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-6)


def test_build_optimizer_groups_by_role():
    model = GPT(GPTConfig.from_depth(4, vocab_size=128, sequence_len=16))  # width 256
    opt = build_optimizer(model)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    adamw = [g for g in opt.param_groups if g["kind"] == "adamw"]
    assert len(muon) == 1 and all(p.ndim == 2 for p in muon[0]["params"])
    assert len(muon[0]["params"]) == 4 * 6  # q, k, v, attn proj, fc, mlp proj per block
    scale = (256 / 768) ** -0.5
    by_param = {id(p): g for g in adamw for p in g["params"]}
    assert by_param[id(model.transformer.wte.weight)]["lr"] == pytest.approx(0.2 * scale)
    assert by_param[id(model.lm_head.weight)]["lr"] == pytest.approx(0.004 * scale)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 for g in adamw)
    counts = {}
    for g in opt.param_groups:
        for p in g["params"]:
            counts[id(p)] = counts.get(id(p), 0) + 1
    assert sorted(counts) == sorted(id(p) for p in model.parameters()) and set(counts.values()) == {1}


def test_partition_check_catches_missing_and_repeated_parameters():
    model = tiny_model()
    roles = model.param_roles()
    with pytest.raises(ValueError, match="missing"):
        check_partition(model, [dict(params=roles["matrix"]), dict(params=roles["embedding"])])
    with pytest.raises(ValueError, match="repeated"):
        check_partition(
            model,
            [dict(params=roles["matrix"] + roles["embedding"]), dict(params=roles["embedding"] + roles["unembedding"])],
        )


def test_muon_lr_scales_with_aspect_ratio():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.zeros(64, 16))  # rows/cols = 4 -> lr x 2
    wide = torch.nn.Parameter(torch.zeros(16, 64))  # -> lr x 1
    opt = MuonAdamW([dict(params=[tall, wide], kind="muon", lr=0.1, ns_dtype="float32")])
    tall.grad, wide.grad = torch.randn(64, 16), torch.randn(16, 64)
    opt.step()
    # An orthogonalised m x n update has Frobenius norm ~ sqrt(min(m, n)) (singular values ~1).
    tall_rms = tall.detach().norm() / 16**0.5
    wide_rms = wide.detach().norm() / 16**0.5
    assert tall_rms / wide_rms == pytest.approx(2.0, rel=0.15)


def test_schedules():
    # 100 steps, warmdown over the last 20: flat to step 80, then linear to 0 at step 100.
    default = ScheduleConfig()
    assert [lr_multiplier(s, 100, default) for s in (0, 50, 80)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(90, 100, default) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, default) == 0.0
    assert lr_multiplier(90, 100, ScheduleConfig(final_lr_frac=0.1)) == pytest.approx(0.55)
    assert [lr_multiplier(s, 100, ScheduleConfig(warmup_ratio=0.1)) for s in (0, 4, 9)] == pytest.approx(
        [0.1, 0.5, 1.0]
    )
    assert lr_multiplier(90, 100, ScheduleConfig(init_lr_frac=0.02)) == pytest.approx(0.01)
    assert [muon_momentum(s, default) for s in (0, 150, 300, 5000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    with pytest.raises(UserError, match="ratios"):
        ScheduleConfig(warmup_ratio=0.6, warmdown_ratio=0.6)


def test_apply_schedule_and_state_dict_resume_exactly():
    torch.manual_seed(0)
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(ns_dtype="float32"))
    opt.apply_schedule(0.5, 0.9)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.5 * g["initial_lr"])
        if g["kind"] == "muon":
            assert g["momentum"] == 0.9
    x = torch.randint(0, 128, (2, 16))
    for _ in range(2):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
    # A copy restored from a saved checkpoint takes exactly the same next step.
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    clone = tiny_model()
    clone.load_state_dict(saved["model"])
    clone_opt = build_optimizer(clone, OptimizerConfig(ns_dtype="float32"))
    clone_opt.load_state_dict(saved["optimizer"])
    for m, o in ((model, opt), (clone, clone_opt)):
        m(x, x).backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_several_matrices_of_mixed_shapes_equal_torch_muon_per_matrix(monkeypatch):
    # A group of many matrices (as a GPT's blocks give): each gets exactly its own update and momentum.
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.float())
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 64), (64, 32), (64, 32), (32, 64)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonAdamW([dict(params=ours, kind="muon", lr=0.02, momentum=0.95, ns_dtype="float32")])
    ref_opts = [
        torch.optim.Muon(
            [r],
            lr=0.02,
            momentum=0.95,
            nesterov=True,
            weight_decay=0.0,
            ns_coefficients=(3.4445, -4.7750, 2.0315),
            ns_steps=5,
            adjust_lr_fn="original",
        )
        for r in refs
    ]
    for _ in range(4):
        for p, r in zip(ours, refs):
            p.grad = torch.randn(p.shape)
            r.grad = p.grad.clone()
        opt.step()
        for ref_opt in ref_opts:
            ref_opt.step()
    for p, r, ref_opt in zip(ours, refs, ref_opts):
        torch.testing.assert_close(p.detach(), r.detach(), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"])
