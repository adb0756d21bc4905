"""The BentoML service: `bentoml serve serving.service:LLMService` (what `llmstack serve` / `make serve` run).

Thin by design: the OpenAI API is a FastAPI app (serving/api.py) mounted at the root; BentoML supplies the server,
/livez, /healthz, /readyz (ready once __init__ has loaded and warmed the model) and /metrics (its bentoml_* series
plus ours from serving/metrics.py). The config comes from LLMSTACK_SERVE_CONFIG (written by `llmstack serve`) or
configs/serve.yaml.

Built into a Bento (`llmstack bento`, deploy/bento.py), the Bento arguments name the model (`model`: a BentoML model
tag, declared below so bento.yaml lists it and `bentoml containerize` ships it) and the config (`config`, baked at
build time; LLMSTACK_SERVE_CONFIG still wins when set); the service then serves that model's folder.
"""
from __future__ import annotations

import logging
import os

import bentoml

from serving.api import Guard, build_app
from serving.config import ServeConfig
from serving.runtime import CONFIG_ENV, build_state, close_state, load_config
from serving.swap import Swapper

# BentoML's handlers pass INFO, its root level does not: the service's own events (what is served, swaps, worker
# starts) and the audit lines of named keys without auth.audit_log are INFO and belong in the server log
for _name in ("serving", "llmstack.audit"):
    logging.getLogger(_name).setLevel(logging.INFO)
BENTO_ARGS = bentoml.use_arguments()  # empty unless built / served as a Bento
BENTO_MODEL = getattr(BENTO_ARGS, "model", None)
BENTO_CONFIG = getattr(BENTO_ARGS, "config", None)
CFG = (ServeConfig.model_validate(BENTO_CONFIG) if BENTO_CONFIG and not os.environ.get(CONFIG_ENV)
       else load_config())
app = build_app()


@bentoml.service(name="llmstack", workers=1, traffic={"timeout": 900})
@bentoml.asgi_app(app, path="/")
class LLMService:
    if BENTO_MODEL:
        bento_model = bentoml.models.BentoModel(BENTO_MODEL)  # from the Bento's (or BENTOML_HOME's) model store

    def __init__(self) -> None:
        cfg = CFG
        if BENTO_MODEL:
            cfg = CFG.model_copy(deep=True)
            cfg.model.path = str(self.bento_model.path)
        state, self.ref = build_state(cfg)
        app.state.llm = state
        app.state.swapper = Swapper(app, cfg)  # POST /admin/reload: another model, without a restart

    def __is_ready__(self) -> bool:
        return bool(app.state.llm.gen.ready)  # the served model, a swapped-in one included

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        close_state(app.state.llm)


LLMService.add_asgi_middleware(Guard, api_key=CFG.auth.api_key(), keys_file=CFG.auth.keys_file,
                               audit_log=CFG.auth.audit_log, open_routes=CFG.auth.open_routes,
                               max_body_bytes=CFG.limits.max_body_bytes)
