"""`nanochat serve`: one process, one engine, the Gradio chat at / and the OpenAI-compatible API at /v1.

Binds to localhost unless told otherwise; with `api_key` (or NANOCHAT_API_KEY) the API needs
`Authorization: Bearer <key>` and the UI asks for the key as its password.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

log = logging.getLogger("nanochat.serve")


def run(cfg) -> None:
    import uvicorn

    from nanochat.serving import default_model_name, load_engine
    from nanochat.serving.api import create_app

    engine, tokenizer, _meta, precision = load_engine(cfg.ckpt, cfg.device, cfg.use_tools, cfg.precision)
    model_name = cfg.model_name or default_model_name(cfg.ckpt)
    app = create_app(
        engine,
        tokenizer,
        model_name,
        api_key=cfg.api_key or None,
        limits=OmegaConf.to_object(cfg.limits),
        sampling=OmegaConf.to_object(cfg.sampling),
    )
    if cfg.ui:
        from nanochat.serving.webui import mount_ui

        app = mount_ui(app, api_key=cfg.api_key or None)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("serving on %s without an api_key: anyone who can reach this port can use the model", cfg.host)
    log.info(
        "%s on %s, %s (context %d tokens): UI http://%s:%d/  API http://%s:%d/v1",
        model_name,
        engine.device,
        precision,
        engine.max_context,
        cfg.host,
        cfg.port,
        cfg.host,
        cfg.port,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
