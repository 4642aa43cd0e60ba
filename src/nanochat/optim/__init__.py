from nanochat.optim.muon import newton_schulz
from nanochat.optim.muon_adamw import MuonAdamW
from nanochat.optim.param_groups import build_optimizer
from nanochat.optim.schedules import lr_multiplier, muon_momentum

__all__ = ["MuonAdamW", "build_optimizer", "lr_multiplier", "muon_momentum", "newton_schulz"]
