"""Hydra/OmegaConf glue: where the configs are, the resolvers and typed schemas the YAML uses, and `compose()`.

The configs ship inside the package (`nanochat/conf`, the top-level `conf/` of a checkout), so an installed
`nanochat` trains from any directory. Typed schemas (dataclasses registered under `schema/`) are the one source of
the optimizer's, schedule's, horizon's, transfer's, sampling's and server limits' defaults: the YAML selects them and
overrides values, Hydra rejects unknown keys and wrong types, and each dataclass checks its ranges when built.
Kept free of torch and lightning imports so `nanochat train --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def _lightning_precision(requested: str, device_type: str) -> str:
    """A trainer preset's `precision`: the run's `precision` key (auto | fp32 | bf16) resolved for its device."""
    from nanochat.precision import resolve

    return resolve(requested, device_type).lightning


def _newton_schulz_dtype(lightning_precision: str) -> str:
    """Muon's Newton-Schulz dtype for a run: bf16 when the run trains in bf16 (nanochat's choice), else fp32."""
    from nanochat.precision import from_lightning

    return "bfloat16" if from_lightning(lightning_precision).name == "bf16" else "float32"


def register_resolvers() -> None:
    from nanochat.paths import SHARED_DATA_BESIDE_CHECKOUT, base_dir, shared_data_dir

    resolvers = {
        "nanochat_home": lambda: str(base_dir()),
        # ../shared/data beside the checkout (or NANOCHAT_SHARED_DATA); named even when absent, for error messages
        "shared_data": lambda: str(shared_data_dir() or SHARED_DATA_BESIDE_CHECKOUT),
        "lightning_precision": _lightning_precision,
        "newton_schulz_dtype": _newton_schulz_dtype,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    register_schemas()


def register_schemas() -> None:
    """The typed schemas, as `schema/<name>` configs the YAML puts where it needs them."""
    from hydra.core.config_store import ConfigStore

    from nanochat.settings import (
        HorizonConfig,
        OptimizerConfig,
        SamplingConfig,
        ScheduleConfig,
        ServerLimits,
        TokenizerConfig,
        TransferConfig,
    )

    store = ConfigStore.instance()
    schemas = {
        "optimizer": OptimizerConfig,
        "schedule": ScheduleConfig,
        "horizon": HorizonConfig,
        "transfer": TransferConfig,
        "sampling": SamplingConfig,
        "server_limits": ServerLimits,
        "tokenizer": TokenizerConfig,
    }
    for name, node in schemas.items():
        store.store(group="schema", name=name, node=node)


def override_key(override: str) -> str:
    """The dotted key a command-line override sets: `+model.depth=6` -> `model.depth`, `~logger` -> `logger`."""
    return override.split("=", 1)[0].lstrip("+~")


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """The config `nanochat train` would run with, for the given command-line overrides (no run dir is created)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)
