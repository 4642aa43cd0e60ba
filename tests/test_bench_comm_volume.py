"""bench/comm_volume.py against hand-computed values for a tiny GPT, and against a real optimizer's state."""

import pytest
import torch

from nanochat.models.components import GPT, GPTConfig
from nanochat.optim import build_optimizer

# d2 at vocab 512: width 128, one head; per layer 4 attention matrices 128x128 and the MLP's 512x128 and 128x512
WIDTH, VOCAB, LAYERS = 128, 512, 2
MUON = LAYERS * 12 * WIDTH * WIDTH  # 393,216
EMBEDDING = UNEMBEDDING = VOCAB * WIDTH  # 65,536 each
TOTAL = MUON + EMBEDDING + UNEMBEDDING  # 524,288


@pytest.fixture(scope="module")
def cv():
    import comm_volume  # bench/ is on pytest's pythonpath (pyproject.toml)

    return comm_volume


@pytest.fixture(scope="module")
def config():
    return GPTConfig.from_depth(LAYERS, VOCAB, 64)


@pytest.fixture(scope="module")
def stats(cv, config):
    return cv.model_stats(config)


def test_parameter_counts_are_the_models(stats, config):
    model = GPT(config)  # a real one, on the CPU
    assert stats["total"] == model.num_params() == TOTAL
    assert (stats["muon"], stats["embedding"], stats["unembedding"]) == (MUON, EMBEDDING, UNEMBEDDING)
    assert stats["adamw"] == EMBEDDING + UNEMBEDDING
    assert dict(stats["muon_shapes"]) == {(128, 128): 4 * LAYERS, (512, 128): LAYERS, (128, 512): LAYERS}
    assert stats["param_dtype"] == "float32" and stats["param_bytes"] == 4
    assert stats["flops_per_token"] == model.flops_per_token()


def test_collective_volumes(cv, stats):
    assert cv.all_reduce_bytes(1000, 8) == pytest.approx(1750)  # 2 (N-1)/N
    assert cv.reduce_scatter_bytes(1000, 8) == cv.all_gather_bytes(1000, 8) == pytest.approx(875)
    ddp = cv.ddp_bytes(stats, 8, 4)
    assert ddp == pytest.approx(2 * 7 / 8 * TOTAL * 4) == pytest.approx(3_670_016)
    # FULL_SHARD: two all-gathers + one reduce-scatter = 1.5x the all-reduce's elements; bf16 halves the bytes
    assert cv.fsdp_bytes_per_micro_step(stats, 8, 4) == pytest.approx(1.5 * ddp)
    assert cv.fsdp_bytes_per_micro_step(stats, 8, 2) == pytest.approx(0.75 * ddp)


def test_sharded_optimizer_volume_with_and_without_padding(cv, stats):
    # 2 ranks: every Muon shape group (8, 2, 2 matrices) and both 512-row AdamW tensors split evenly
    layout = cv.sharded_layout(stats, 2)
    assert layout["padding_elems"] == 0 and layout["all_reduced_elems"] == 0
    assert cv.sharded_bytes(stats, 2, 4) == pytest.approx(cv.ddp_bytes(stats, 2, 4))  # RS + AG = all-reduce
    # 8 ranks: the two MLP groups of 2 matrices are zero-padded to 8 each, as nanochat's DistMuon stacks them
    layout = cv.sharded_layout(stats, 8)
    padded = 8 * 128 * 128 + 8 * 512 * 128 + 8 * 128 * 512 + 2 * 512 * 128
    assert layout["sharded_elems"] == padded == 1_310_720
    assert layout["padding_elems"] == padded - TOTAL
    assert cv.sharded_bytes(stats, 8, 4) == pytest.approx(2 * 7 / 8 * padded * 4)


def test_optimizer_state_matches_a_real_muon_adamw(cv, stats, config, one_torch_thread):
    torch.manual_seed(0)
    model = GPT(config)
    opt = build_optimizer(model)
    idx = torch.randint(0, VOCAB, (1, 8))
    model(idx, idx).backward()
    opt.step()
    real = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert cv.optimizer_state_bytes(stats) == real == MUON * 4 + 2 * (EMBEDDING + UNEMBEDDING) * 4 + 2 * 4
    # sharded over 2 ranks: half of every Muon group's matrices, half the rows of each AdamW tensor
    assert cv.optimizer_state_bytes(stats, 2) == (MUON // 2) * 4 + 2 * (EMBEDDING + UNEMBEDDING) // 2 * 4 + 2 * 4


def test_estimate_scales_with_accumulation(cv, stats, config):
    # 2 ranks x 4 rows x 64 tokens = 512 tokens per pass; 1,024 tokens per step -> 2 micro-steps
    r = cv.estimate(
        config,
        world=2,
        total_batch_size=1024,
        device_batch_size=4,
        bus_gbps=100,
        mfu=0.5,
        peak_flops=1e12,
        grad_bytes=4,
        fsdp_bytes=2,
        stats=stats,
    )
    assert r["accum"] == 2
    b = r["bytes"]
    assert b["ddp"] == pytest.approx(2 * 1 / 2 * TOTAL * 4)
    assert b["ddp_every_micro_step"] == pytest.approx(2 * b["ddp"])
    assert b["fsdp"] == pytest.approx(2 * b["fsdp_per_micro_step"]) and b["fsdp_per_micro_step"] == pytest.approx(
        0.75 * b["ddp"]
    )
    assert b["ddp_wte_bucket"] == pytest.approx(2 * 1 / 2 * EMBEDDING * 4)
    assert r["seconds"]["ddp"] == pytest.approx(b["ddp"] / 100e9)
    assert r["compute_s"] == pytest.approx(stats["flops_per_token"] * 1024 / (2 * 1e12 * 0.5))
    assert r["overlap_window_s"] == pytest.approx(r["compute_s"] / 2 * 2 / 3)
    m = r["memory"]
    assert m["weights"] == m["grads"] == TOTAL * 4
    assert m["ddp"] == 2 * TOTAL * 4 + cv.optimizer_state_bytes(stats)
    assert m["fsdp_sharded_part"] == pytest.approx((2 * TOTAL * 4 + cv.optimizer_state_bytes(stats)) / 2)
    assert m["sharded"] == 2 * TOTAL * 4 + cv.optimizer_state_bytes(
        stats, 2
    )  # nanochat's sharding keeps full gradients
    assert m["fp32_logits_copy"] == 4 * 64 * VOCAB * 4


def test_dtypes_and_batches_come_from_the_configs(cv):
    assert cv.model_batch(32) == (524_288, 8)
    assert cv.ddp_grad_bytes(cv.trainer_strategy("8xh100"), 4) == 4  # no compression hook configured: fp32
    assert (
        cv.ddp_grad_bytes(
            {"ddp_comm_hook": "torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook"}, 4
        )
        == 2
    )
    assert cv.fsdp_comm_bytes("bf16-mixed") == 2 and cv.fsdp_comm_bytes("32-true") == 4  # Lightning's FSDPPrecision
    assert cv.fitting_device_batch(524_288, 32, 16) == 16  # multinode.yaml: d20 needs device batch 16 on 16 GPUs
