"""The BentoML service: `bentoml serve serving.service:LLMService` (what `llmstack serve` / `make serve` run).

Thin by design: the OpenAI API is a FastAPI app (serving/api.py) mounted at the root; BentoML supplies the server,
/livez, /healthz, /readyz (ready once __init__ has loaded and warmed the model) and /metrics (its bentoml_* series
plus ours from serving/metrics.py). The config comes from LLMSTACK_SERVE_CONFIG (written by `llmstack serve`) or
configs/serve.yaml.
"""
from __future__ import annotations


import bentoml

from serving.api import Guard, build_app
from serving.runtime import build_state, close_state, load_config

CFG = load_config()
app = build_app()


@bentoml.service(name="llmstack", workers=1, traffic={"timeout": 900})
@bentoml.asgi_app(app, path="/")
class LLMService:
    def __init__(self) -> None:
        self.state, self.ref = build_state(CFG)
        app.state.llm = self.state

    def __is_ready__(self) -> bool:
        return bool(self.state.gen.ready)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        close_state(self.state)


LLMService.add_asgi_middleware(Guard, api_key=CFG.auth.api_key(),
                               open_routes=CFG.auth.open_routes, max_body_bytes=CFG.limits.max_body_bytes)
