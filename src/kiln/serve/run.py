"""`kiln serve`: the run's model behind the OpenAI-compatible API on uvicorn."""

from __future__ import annotations

import socket

from kiln.config import Config, ConfigError


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use is said at once, not after the load."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a restart need not wait out TIME_WAIT
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; another program (a kiln serve "
                          "still running?) may hold it: stop it or pick another --port") from None
    return sock


def run_serve(cfg: Config) -> None:
    import uvicorn

    from kiln.serve.app import build_app
    from kiln.serve.loader import load_served

    s = cfg.serve
    sock = listen(s.host, s.port)
    try:
        served = load_served(cfg, start=False)   # the app's lifespan starts and stops the engine
        if s.host not in ("127.0.0.1", "localhost", "::1") and served.api_key is None:
            print(f"warning: serving on {s.host} without an API key: anyone who can reach this port can use the "
                  "model (set --serve.api_key or KILN_API_KEY)", flush=True)
        print(f"kiln serve: http://{s.host}:{s.port}/ (chat page), OpenAI API at http://{s.host}:{s.port}/v1, "
              f"model {', '.join(f'`{n}`' for n in served.names)}", flush=True)
        config = uvicorn.Config(build_app(served, s), log_level="warning", timeout_graceful_shutdown=5)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:   # uvicorn shut down gracefully, then re-raised the Ctrl-C (as uvicorn.run hides)
            pass
    finally:
        sock.close()
