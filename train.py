"""Train any stage from config: `python train.py stage=base model=d20 trainer=8xh100`.

Compose the config, hand it to the stage's entry point (`stage.entry`), which instantiates the data,
module, callbacks, logger and Trainer and fits. Heavy imports happen inside the stage, so `--help` and
`--cfg job` return at once.
"""

import hydra
from omegaconf import DictConfig

from nanochat.configs import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from nanochat.stages import run_stage

    run_stage(cfg)


if __name__ == "__main__":
    main()
