"""`kiln serve`: the run's model behind the OpenAI-compatible API on uvicorn."""

from __future__ import annotations

from kiln.config import Config


def run_serve(cfg: Config) -> None:
    import uvicorn

    from kiln.serve.app import build_app
    from kiln.serve.loader import load_served

    s = cfg.serve
    served = load_served(cfg, start=False)   # the app's lifespan starts and stops the engine
    if s.host not in ("127.0.0.1", "localhost", "::1") and served.api_key is None:
        print(f"warning: serving on {s.host} without an API key: anyone who can reach this port can use the "
              "model (set --serve.api_key or KILN_API_KEY)", flush=True)
    print(f"kiln serve: http://{s.host}:{s.port}/ (chat page), OpenAI API at http://{s.host}:{s.port}/v1, "
          f"model `{served.name}`", flush=True)
    uvicorn.run(build_app(served, s), host=s.host, port=s.port, log_level="warning", timeout_graceful_shutdown=5)
