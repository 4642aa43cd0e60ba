"""Data-parallel communication and optimizer memory per GPU at d20/d26/d32, on paper (no GPU, no network).

    python bench/comm_volume.py [--depths 20 26 32] [--world 8] [--bus-gbps 450] [--mfu 0.5]
                                [--nodes-world 16] [--internode-gbps 400] [--slow-internode-gbps 12.5]
                                [--json bench/results/comm_volume.json]

Everything that can come from the code does: the GPT is built on the `meta` device from
`GPTConfig.from_depth(depth, 65,536, 2,048)` (no memory, no compute), the parameter groups are the ones
`build_optimizer` gives MuonAdamW, FLOPs per token are `GPT.flops_per_token()`, the token batch and device batch
are read from conf/model/d{depth}.yaml, gradient accumulation is `grad_accum_steps` (as the DataModule computes
it), the DDP settings from conf/trainer/8xh100.yaml, FSDP's communication dtype from Lightning's own
`FSDPPrecision("bf16-mixed")`, and the H100 peak from nanochat.hardware's table.

Three ways to spread a step over N GPUs; bytes are what each GPU *sends* per optimizer step with NCCL's ring
algorithms (it receives the same amount):

* DDP (what trainer=8xh100 runs): one ring all-reduce of every gradient, 2(N-1)/N x bytes, in the gradients' dtype.
  Weights are fp32 and bf16-mixed autocasts only the matmuls, so gradients are fp32; no DDP comm hook is
  configured, so they are all-reduced in fp32. PretrainModule wraps non-final micro-batches in
  `toggle_model(sync_grad=False)` (DDP no_sync), so this happens once per optimizer step, overlapped with the
  last micro-batch's backward. The column "every micro-step" is what it would cost without that.
* A ZeRO-1/2 sharded optimizer as nanochat's DistMuon/DistAdamW do it: reduce-scatter the gradients, each rank
  updates the matrices (Muon: whole matrices, a shape group stacked and zero-padded to ceil(K/N)*N) or the dim-0
  slice (AdamW) it owns, all-gather the updated weights: (N-1)/N + (N-1)/N = the all-reduce's volume (plus the
  padding), with optimizer state / N. The collectives start after backward (in `step()`), so they do not overlap it.
* Lightning FSDPStrategy FULL_SHARD: all-gather the weights for forward, again for backward, reduce-scatter the
  gradients: 3(N-1)/N = 1.5x the all-reduce's elements, per *micro-step* (the weights are resharded after each
  forward and backward, and Lightning's `toggle_model` only suppresses sync for DDP), in bf16 under bf16-mixed.

Time = bytes sent per GPU / bus bandwidth (NCCL's "bus bandwidth" is defined so this holds for ring
collectives; nccl-tests report 460-480 GB/s for all_reduce on 8 x H100 SXM, 450 GB/s is assumed). Across nodes a
ring's bus bandwidth is bounded by a node's total NIC bandwidth (NCCL runs a ring per NIC, each crossing the
node boundary once each way). Compute per step = FLOPs/token x tokens per step / (GPUs x peak x MFU).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path
from unittest.mock import patch

import torch
import yaml
from common import markdown_table, save

from nanochat.hardware import GPU_PEAK_BF16
from nanochat.models.components import GPT, GPTConfig
from nanochat.models.horizon import grad_accum_steps
from nanochat.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]

VOCAB_SIZE, SEQ_LEN = 65_536, 2_048
GB, GiB = 1e9, 2**30
# nanochat's newer auto batch size depends only on depth: d18-26 -> 2^20 tokens, d32-50 -> 2^21.
NANOCHAT_AUTO_BATCH = {20: 2**20, 26: 2**20, 32: 2**21}
SMALL_ADAMW = 1024  # nanochat all-reduces AdamW params with fewer elements instead of sharding them


# --- the model and its optimizer groups -----------------------------------------------------------
def meta_model(config: GPTConfig) -> GPT:
    """The real GPT on the `meta` device: every parameter's shape and dtype, no memory. Initialisers are skipped
    (they only fill values, and random fills on `meta` go through a slow first-use path in torch)."""

    def no_init(self):
        return None

    with (
        torch.device("meta"),
        patch.object(GPT, "init_weights", no_init),
        patch.object(torch.nn.Linear, "reset_parameters", no_init),
        patch.object(torch.nn.Embedding, "reset_parameters", no_init),
    ):
        return GPT(config)


def model_stats(config: GPTConfig) -> dict:
    """Parameter counts by optimizer group, shapes and dtypes of the real GPT and MuonAdamW's real groups."""
    model = meta_model(config)
    optimizer = build_optimizer(model)  # the real groups; raises if they do not partition the parameters
    roles = model.param_roles()
    muon = [p for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]]
    adamw = [p for g in optimizer.param_groups if g["kind"] == "adamw" for p in g["params"]]
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        raise ValueError(f"expected one parameter dtype, got {dtypes}")
    return {
        "total": model.num_params(),
        "muon": sum(p.numel() for p in muon),
        "embedding": sum(p.numel() for p in roles["embedding"]),
        "unembedding": sum(p.numel() for p in roles["unembedding"]),
        "adamw": sum(p.numel() for p in adamw),
        "muon_shapes": sorted(Counter(tuple(p.shape) for p in muon).items()),  # [((rows, cols), K), ...]
        "adamw_shapes": [tuple(p.shape) for p in adamw],
        "param_dtype": str(dtypes.pop()).replace("torch.", ""),
        "param_bytes": next(model.parameters()).element_size(),
        "flops_per_token": model.flops_per_token(),
        "bucket_count": ddp_bucket_count(model),
    }


def ddp_bucket_count(model: torch.nn.Module) -> int | None:
    """Gradient buckets DDP forms with its defaults (1 MiB first bucket, then 25 MiB), in backward order."""
    import torch.distributed as dist

    params = list(reversed(list(model.parameters())))  # lm_head's gradient is ready first, wte's last
    try:
        buckets, _ = dist._compute_bucket_assignment_by_size(
            params, [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * 2**20], [False] * len(params)
        )
    except (AttributeError, RuntimeError, TypeError):  # a private helper: the count is a detail, never a reason to fail
        return None
    return len(buckets)


# --- what the configuration says ------------------------------------------------------------------
def model_batch(depth: int) -> tuple[int, int]:
    """(total_batch_size tokens, device_batch_size rows) from conf/model/d{depth}.yaml."""
    conf = yaml.safe_load((REPO / "conf" / "model" / f"d{depth}.yaml").read_text())
    return int(conf["total_batch_size"]), int(conf["device_batch_size"])


def trainer_strategy(name: str = "8xh100") -> dict:
    conf = yaml.safe_load((REPO / "conf" / "trainer" / f"{name}.yaml").read_text())
    strategy = conf["trainer"]["strategy"]
    return dict(strategy) if isinstance(strategy, dict) else {"name": strategy}


def ddp_grad_bytes(strategy: dict, param_bytes: int) -> int:
    """Bytes per gradient element DDP sends: the parameter dtype, unless a compression hook is configured."""
    hook = str(strategy.get("ddp_comm_hook") or "")
    return 2 if ("bf16" in hook or "fp16" in hook) else param_bytes


def fsdp_comm_bytes(precision: str = "bf16-mixed") -> int:
    """Element size of FSDP's all-gathers and reduce-scatters under Lightning's FSDPPrecision(precision)."""
    from lightning.pytorch.plugins.precision import FSDPPrecision

    mp = FSDPPrecision(precision).mixed_precision_config
    return max(
        torch.empty((), dtype=mp.param_dtype).element_size(), torch.empty((), dtype=mp.reduce_dtype).element_size()
    )


def fitting_device_batch(total: int, device_batch: int, world: int) -> int:
    """The configured device batch, halved until world x rows x seq fits into the step (multinode.yaml's advice)."""
    while device_batch > 1 and device_batch * SEQ_LEN * world > total:
        device_batch //= 2
    return device_batch


# --- collectives (bytes each GPU sends with ring algorithms; it receives as many) -------------------
def all_reduce_bytes(nbytes: float, world: int) -> float:
    return 2 * (world - 1) / world * nbytes


def reduce_scatter_bytes(nbytes: float, world: int) -> float:
    return (world - 1) / world * nbytes


all_gather_bytes = reduce_scatter_bytes  # the same volume in the other direction


def ddp_bytes(stats: dict, world: int, grad_bytes: int) -> float:
    return all_reduce_bytes(stats["total"] * grad_bytes, world)


def sharded_layout(stats: dict, world: int) -> dict:
    """nanochat's DistMuon/DistAdamW split: elements communicated (with Muon's zero padding) and state per rank.

    Muon: each shape group of K matrices is stacked and padded to ceil(K/N)*N; rank r owns ceil(K/N) whole
    matrices (Newton-Schulz needs the whole matrix) and keeps their momentum. AdamW: tensors with fewer than
    1,024 elements are all-reduced and updated everywhere; larger ones are split along dim 0 (which must divide
    by N) and each rank keeps exp_avg and exp_avg_sq of its slice.
    """
    sharded_elems = all_reduced_elems = 0
    muon_state = adamw_state = 0  # elements of optimizer state per rank
    for (rows, cols), k in stats["muon_shapes"]:
        per_rank = math.ceil(k / world)
        sharded_elems += per_rank * world * rows * cols
        muon_state += per_rank * rows * cols  # momentum buffer
    for shape in stats["adamw_shapes"]:
        numel = math.prod(shape)
        if numel < SMALL_ADAMW or shape[0] % world:
            all_reduced_elems += numel
            adamw_state += 2 * numel
        else:
            sharded_elems += numel
            adamw_state += 2 * numel // world  # exp_avg + exp_avg_sq of the slice
    return {
        "sharded_elems": sharded_elems,
        "all_reduced_elems": all_reduced_elems,
        "padding_elems": sharded_elems + all_reduced_elems - stats["total"],
        "muon_state_elems": muon_state,
        "adamw_state_elems": adamw_state,
    }


def sharded_bytes(stats: dict, world: int, grad_bytes: int) -> float:
    """Reduce-scatter of the gradients + all-gather of the updated weights (+ all-reduce of the small AdamW ones)."""
    layout = sharded_layout(stats, world)
    rs = reduce_scatter_bytes(layout["sharded_elems"] * grad_bytes, world)
    ag = all_gather_bytes(layout["sharded_elems"] * stats["param_bytes"], world)
    return rs + ag + all_reduce_bytes(layout["all_reduced_elems"] * grad_bytes, world)


def fsdp_bytes_per_micro_step(stats: dict, world: int, comm_bytes: int) -> float:
    """FULL_SHARD: all-gather (forward) + all-gather (backward) + reduce-scatter (gradients)."""
    nbytes = stats["total"] * comm_bytes
    return 2 * all_gather_bytes(nbytes, world) + reduce_scatter_bytes(nbytes, world)


def optimizer_state_bytes(stats: dict, world: int = 1) -> int:
    """MuonAdamW's state: Muon momentum (1 x fp32), AdamW exp_avg + exp_avg_sq (2 x fp32) + a 4-byte step each.

    world == 1: replicated, as under DDP today; world > 1: one rank's share under nanochat's sharding.
    """
    b = stats["param_bytes"]
    steps = 4 * len(stats["adamw_shapes"])
    if world == 1:
        return stats["muon"] * b + 2 * stats["adamw"] * b + steps
    layout = sharded_layout(stats, world)
    return (layout["muon_state_elems"] + layout["adamw_state_elems"]) * b + steps


# --- one configuration ------------------------------------------------------------------------------
def estimate(
    config: GPTConfig,
    *,
    world: int,
    total_batch_size: int,
    device_batch_size: int,
    bus_gbps: float,
    mfu: float,
    peak_flops: float,
    grad_bytes: int | None = None,
    fsdp_bytes: int = 2,
    stats: dict | None = None,
) -> dict:
    stats = stats or model_stats(config)
    grad_bytes = grad_bytes or stats["param_bytes"]
    accum = grad_accum_steps(total_batch_size, device_batch_size, config.sequence_len, world)
    bw = bus_gbps * GB
    compute_s = stats["flops_per_token"] * total_batch_size / (world * peak_flops * mfu)
    ddp = ddp_bytes(stats, world, grad_bytes)
    sharded = sharded_bytes(stats, world, grad_bytes)
    fsdp_micro = fsdp_bytes_per_micro_step(stats, world, fsdp_bytes)
    volume = {
        "ddp": ddp,
        "ddp_every_micro_step": accum * ddp,
        "ddp_wte_bucket": all_reduce_bytes(stats["embedding"] * grad_bytes, world),  # the last gradient to be ready
        "sharded": sharded,
        "fsdp_per_micro_step": fsdp_micro,
        "fsdp": accum * fsdp_micro,
    }
    seconds = {k: v / bw for k, v in volume.items()}
    weights = stats["total"] * stats["param_bytes"]
    grads = weights  # .grad has the weights' dtype whatever DDP sends (a compression hook casts a copy)
    opt_full, opt_shard = optimizer_state_bytes(stats), optimizer_state_bytes(stats, world)
    return {
        "depth": config.n_layer,
        "world": world,
        "params": stats,
        "total_batch_size": total_batch_size,
        "device_batch_size": device_batch_size,
        "accum": accum,
        "compute_s": compute_s,
        # the last micro-step's backward (2/3 of its FLOPs) is the window DDP's bucketed all-reduce hides in
        "overlap_window_s": compute_s / accum * 2 / 3,
        "grad_bytes": grad_bytes,
        "fsdp_comm_bytes": fsdp_bytes,
        "sharded_padding_elems": sharded_layout(stats, world)["padding_elems"],
        "bytes": volume,
        "seconds": seconds,
        "share_of_compute": {k: v / compute_s for k, v in seconds.items()},
        "memory": {
            "weights": weights,
            "grads": grads,
            "optimizer_replicated": opt_full,
            "optimizer_sharded": opt_shard,
            "ddp": weights + grads + opt_full,
            "sharded": weights + grads + opt_shard,
            "fsdp_sharded_part": (weights + grads + opt_full) / world,  # flat shards: no padding
            "fp32_logits_copy": device_batch_size * config.sequence_len * config.vocab_size * 4,
        },
        "bus_gbps": bus_gbps,
        "mfu": mfu,
        "peak_flops": peak_flops,
    }


# --- the tables --------------------------------------------------------------------------------------
def gb(x: float) -> str:
    return f"{x / GB:,.2f} GB"


def gib(x: float) -> str:
    return f"{x / GiB:,.2f}"


def ms(s: float) -> str:
    return f"{1e3 * s:,.1f} ms"


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def tables(rows: list[dict], nodes: list[dict], args) -> str:
    w = args.world
    t1 = markdown_table(
        [
            "model",
            "parameters",
            "Muon (block matrices)",
            "AdamW (wte + lm_head)",
            "param / grad dtype",
            "tokens per step",
            f"device batch x accumulation ({w} GPUs)",
            "DDP buckets (25 MiB)",
            "compute per step",
        ],
        [
            [
                f"d{r['depth']}",
                f"{r['params']['total']:,}",
                f"{r['params']['muon']:,}",
                f"{r['params']['embedding']:,} + {r['params']['unembedding']:,}",
                f"{r['params']['param_dtype']} / {'fp32' if r['grad_bytes'] == 4 else 'bf16'}",
                f"{r['total_batch_size']:,}",
                f"{r['device_batch_size']} x {r['accum']}",
                r["params"]["bucket_count"],
                ms(r["compute_s"]),
            ]
            for r in rows
        ],
    )
    t2 = markdown_table(
        [
            "model",
            "DDP all-reduce, fp32 (as run)",
            "DDP if every micro-step synced",
            "sharded optimizer RS + AG, fp32",
            "FSDP FULL_SHARD, bf16, per micro-step",
            "FSDP per optimizer step",
        ],
        [
            [
                f"d{r['depth']}",
                gb(r["bytes"]["ddp"]),
                f"{gb(r['bytes']['ddp_every_micro_step'])} ({r['accum']}x)",
                gb(r["bytes"]["sharded"])
                + (
                    f" (incl. {r['sharded_padding_elems'] / 1e6:.1f}M padding elements)"
                    if r["sharded_padding_elems"]
                    else ""
                ),
                gb(r["bytes"]["fsdp_per_micro_step"]),
                f"{gb(r['bytes']['fsdp'])} ({r['accum']}x)",
            ]
            for r in rows
        ],
    )
    t3 = markdown_table(
        [
            "model",
            "compute per step",
            "DDP",
            "DDP / compute",
            "overlap window (last backward)",
            "DDP exposed tail (wte bucket)",
            "DDP if every micro-step",
            "sharded RS + AG (not overlapped)",
            "FSDP",
            "DDP / compute at nanochat's auto batch",
        ],
        [
            [
                f"d{r['depth']}",
                ms(r["compute_s"]),
                ms(r["seconds"]["ddp"]),
                pct(r["share_of_compute"]["ddp"]),
                ms(r["overlap_window_s"]),
                ms(r["seconds"]["ddp_wte_bucket"]),
                f"{ms(r['seconds']['ddp_every_micro_step'])} ({pct(r['share_of_compute']['ddp_every_micro_step'])})",
                f"{ms(r['seconds']['sharded'])} ({pct(r['share_of_compute']['sharded'])})",
                f"{ms(r['seconds']['fsdp'])} ({pct(r['share_of_compute']['fsdp'])})",
                f"{pct(r['auto_batch_share'])} (B = {r['auto_batch']:,})",
            ]
            for r in rows
        ],
    )
    t4 = markdown_table(
        [
            "model",
            "weights fp32",
            "gradients fp32",
            "optimizer state, replicated (DDP today)",
            f"optimizer state, sharded /{w}",
            "DDP total",
            "sharded-optimizer total",
            "FSDP FULL_SHARD (sharded part)",
            "one fp32 logits tensor at the device batch",
        ],
        [
            [
                f"d{r['depth']}",
                gib(m["weights"]),
                gib(m["grads"]),
                gib(m["optimizer_replicated"]),
                gib(m["optimizer_sharded"]),
                gib(m["ddp"]),
                gib(m["sharded"]),
                gib(m["fsdp_sharded_part"]),
                gib(m["fp32_logits_copy"]),
            ]
            for r in rows
            for m in [r["memory"]]
        ],
    )
    t5 = markdown_table(
        [
            "model",
            "GPUs",
            "device batch x accumulation",
            "compute per step",
            "overlap window",
            "DDP fp32 per GPU",
            f"at {args.internode_gbps:g} GB/s",
            f"at {args.slow_internode_gbps:g} GB/s",
            f"at {args.slow_internode_gbps:g} GB/s with bf16_compress_hook",
        ],
        [
            [
                f"d{r['depth']}",
                r["world"],
                f"{r['device_batch_size']} x {r['accum']}",
                ms(r["compute_s"]),
                ms(r["overlap_window_s"]),
                gb(r["bytes"]["ddp"]),
                f"{ms(r['seconds']['ddp'])} ({pct(r['share_of_compute']['ddp'])})",
                f"{ms(slow['seconds']['ddp'])} ({pct(slow['share_of_compute']['ddp'])})",
                f"{ms(slow['seconds']['ddp'] / 2)} ({pct(slow['share_of_compute']['ddp'] / 2)})",
            ]
            for r, slow in nodes
        ],
    )
    return "\n\n".join(
        [
            (
                f"Parameters, batch and compute ({w} GPUs, {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s bf16):"
                f"\n\n{t1}"
            ),
            f"Bytes each GPU sends per optimizer step (it receives as many), {w} GPUs:\n\n{t2}",
            f"Time at {args.bus_gbps:g} GB/s bus bandwidth (NVLink 4 within one node) against compute:\n\n{t3}",
            f"Static memory per GPU (GiB, activations not included), {w} GPUs:\n\n{t4}",
            (
                f"Two nodes, {args.nodes_world} GPUs, DDP (trainer=multinode): "
                f"inter-node bus bandwidth {args.internode_gbps:g} GB/s "
                f"(8 x 400 Gb/s InfiniBand per node) or {args.slow_internode_gbps:g} GB/s "
                f"(one 100 Gb/s Ethernet link per node):\n\n{t5}"
            ),
        ]
    )


def run(args) -> tuple[list[dict], list[dict]]:
    strategy = trainer_strategy("8xh100")
    fsdp_b = fsdp_comm_bytes("bf16-mixed")
    peak = args.peak_tflops * 1e12
    rows, nodes = [], []
    for depth in args.depths:
        config = GPTConfig.from_depth(depth, VOCAB_SIZE, SEQ_LEN)
        stats = model_stats(config)
        grad_b = ddp_grad_bytes(strategy, stats["param_bytes"])
        total, device_batch = model_batch(depth)
        r = estimate(
            config,
            world=args.world,
            total_batch_size=total,
            device_batch_size=device_batch,
            bus_gbps=args.bus_gbps,
            mfu=args.mfu,
            peak_flops=peak,
            grad_bytes=grad_b,
            fsdp_bytes=fsdp_b,
            stats=stats,
        )
        auto = NANOCHAT_AUTO_BATCH.get(depth, total)
        r["auto_batch"] = auto
        r["auto_batch_share"] = r["seconds"]["ddp"] / (r["compute_s"] * auto / total)
        rows.append(r)
        db = fitting_device_batch(total, device_batch, args.nodes_world)
        nodes.append(
            tuple(
                estimate(
                    config,
                    world=args.nodes_world,
                    total_batch_size=total,
                    device_batch_size=db,
                    bus_gbps=bw,
                    mfu=args.mfu,
                    peak_flops=peak,
                    grad_bytes=grad_b,
                    fsdp_bytes=fsdp_b,
                    stats=stats,
                )
                for bw in (args.internode_gbps, args.slow_internode_gbps)
            )
        )
    return rows, nodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[20, 26, 32])
    p.add_argument("--world", type=int, default=8, help="GPUs in one node")
    p.add_argument("--bus-gbps", type=float, default=450.0, help="all-reduce bus bandwidth within a node, GB/s")
    p.add_argument("--nodes-world", type=int, default=16, help="GPUs over two nodes")
    p.add_argument(
        "--internode-gbps",
        type=float,
        default=400.0,
        help="all-reduce bus bandwidth across nodes, GB/s (about a node's total NIC bandwidth: 8 x 400 Gb/s)",
    )
    p.add_argument("--slow-internode-gbps", type=float, default=12.5, help="the same for one 100 Gb/s link per node")
    p.add_argument("--mfu", type=float, default=0.5)
    p.add_argument("--peak-tflops", type=float, default=dict(GPU_PEAK_BF16)["H100"] / 1e12)
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "comm_volume.json"))
    args = p.parse_args()
    rows, nodes = run(args)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings |= {
        "vocab_size": VOCAB_SIZE,
        "sequence_len": SEQ_LEN,
        "strategy_8xh100": trainer_strategy("8xh100"),
        "fsdp_comm_bytes_bf16_mixed": fsdp_comm_bytes("bf16-mixed"),
        "units": "GB = 1e9 bytes, GiB = 2^30 bytes",
    }
    results = {
        "8_gpus": rows,
        "2_nodes": [fast for fast, _ in nodes],
        "2_nodes_slow_network": [slow for _, slow in nodes],
    }
    save(args.json, tables(rows, nodes, args), results, settings)


if __name__ == "__main__":
    main()
