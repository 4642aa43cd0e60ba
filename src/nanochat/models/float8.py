"""fp8 training of the GPT's large matmuls with torchao's float8 (tensorwise dynamic scaling), where GPUs have it.

`enable(model, device)` converts the nn.Linear layers that fp8 kernels take (both dimensions multiples of 16, the
smaller at least 128: the blocks' projections and the output head, not the small value-embedding and smear gates)
to torchao's Float8Linear, in place, before torch.compile; elsewhere (a CPU, a GPU older than compute capability
8.9, torchao not installed) it logs one line saying why fp8 is off and changes nothing. Evaluation runs in bf16:
`plain_linears(model)` swaps the converted layers back to nn.Linear sharing the same weights for its duration.
torchao is an optional extra: pip install 'nanochat[fp8]'.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_DIM, MULTIPLE = 128, 16  # fp8 GEMMs want dims in multiples of 16; smaller layers lose more than they gain
RECIPE = "tensorwise"


def takes_fp8(module: nn.Module, fqn: str = "") -> bool:
    """Whether a layer is converted: an nn.Linear with both dims multiples of 16 and the smaller at least 128."""
    if not isinstance(module, nn.Linear):
        return False
    dims = (module.in_features, module.out_features)
    return all(d % MULTIPLE == 0 for d in dims) and min(dims) >= MIN_DIM


def unavailable(device: torch.device) -> str | None:
    """Why fp8 training cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return f"the device is {device.type}, and fp8 matmuls need a CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {capability[0]}.{capability[1]}; fp8 needs 8.9+"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install 'nanochat[fp8]')"
    return None


def enable(model: nn.Module, device: torch.device) -> int:
    """Convert the fp8-able Linear layers of `model` for fp8 training on `device`; returns how many (0: fp8 off)."""
    why = unavailable(device)
    if why is not None:
        log.info(f"fp8 off: {why}; training in the run's precision")
        return 0
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(RECIPE), module_filter_fn=takes_fp8)
    converted = sum(is_fp8(m) for m in model.modules())
    log.info(f"fp8 on ({RECIPE} scaling): {converted} of {linears} Linear layers converted, the others too small")
    return converted


def is_fp8(module: nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear"


@contextmanager
def plain_linears(model: nn.Module):
    """Evaluation in bf16: every Float8Linear replaced by an nn.Linear on the same weights, put back afterwards."""
    swapped = []
    for name, module in list(model.named_modules()):
        if is_fp8(module):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight = module.weight
            if module.bias is not None:
                plain.bias = module.bias
            setattr(parent, attr, plain)
            swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
