from nanochat.optim.muon import newton_schulz, polar_express
from nanochat.optim.muon_adamw import MuonAdamW
from nanochat.optim.param_groups import build_optimizer
from nanochat.optim.schedules import lr_multiplier, muon_momentum, muon_weight_decay_multiplier

__all__ = [
    "MuonAdamW",
    "build_optimizer",
    "lr_multiplier",
    "muon_momentum",
    "muon_weight_decay_multiplier",
    "newton_schulz",
    "polar_express",
]
