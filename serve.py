"""Serve a chat model: `python serve.py ckpt=<run dir or export dir> [host=127.0.0.1] [port=8000] [api_key=...]`.

One process, one engine: the Gradio chat at http://host:port/ and the OpenAI-compatible API at /v1
(chat/completions, models) plus /health. Binds to localhost unless told otherwise; with `api_key` (or
NANOCHAT_API_KEY) the API needs `Authorization: Bearer <key>` and the UI asks for the key as its password.
Heavy imports happen inside main, so `--help` and `--cfg job` return at once.
"""

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from nanochat.configs import register_resolvers
from nanochat.errors import exit_on_error

register_resolvers()
log = logging.getLogger("nanochat.serve")


@exit_on_error
def serve(cfg: DictConfig) -> None:
    from nanochat.serving import default_model_name, load_engine

    engine, tokenizer, meta, precision = load_engine(cfg.ckpt, cfg.device, cfg.use_tools, cfg.precision)
    import uvicorn

    from nanochat.serving.api import create_app

    model_name = cfg.model_name or default_model_name(cfg.ckpt)
    defaults = OmegaConf.to_container(cfg.sampling, resolve=True)
    app = create_app(engine, tokenizer, model_name, api_key=cfg.api_key or None, max_waiting=cfg.max_waiting,
                     max_batch=cfg.max_batch, defaults=defaults,
                     max_body_bytes=cfg.max_body_bytes, body_timeout=cfg.body_timeout, send_timeout=cfg.send_timeout,
                     stall_timeout=cfg.stall_timeout)
    if cfg.ui:
        from nanochat.serving.webui import mount_ui

        app = mount_ui(app, api_key=cfg.api_key or None)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("serving on %s without an api_key: anyone who can reach this port can use the model", cfg.host)
    log.info("%s on %s, %s (context %d tokens): UI http://%s:%d/  API http://%s:%d/v1", model_name, engine.device,
             precision, engine.max_context, cfg.host, cfg.port, cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
