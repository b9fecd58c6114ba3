"""`lorafit serve`: load the runs, check that the address is safe to listen on, and run uvicorn until SIGTERM."""

from __future__ import annotations

import gc
import ipaddress
import signal
import socket
import sys
from pathlib import Path

from ..errors import LorafitError
from ..fast.device import set_threads
from ..inference.loaded import SharedBases
from .app import create_app
from .limits import Limits
from .merging import MergedCopies
from .registry import load_served, parse_specs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise LorafitError(f"--token-file: {path} not found; expected a file holding the bearer token on one line")
    token = file.read_text(encoding="utf-8", errors="replace").strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise LorafitError(
            f"--token-file: {path} holds {'no token' if not token else 'a token that is too short or has spaces'}; "
            "expected one line of at least 16 characters, e.g. `python -c 'import secrets; print(secrets.token_urlsafe())' > FILE`"
        )
    return token


def check_address(host: str, token: str | None, trusted_network: bool) -> None:
    if not is_loopback(host) and token is None and not trusted_network:
        raise LorafitError(
            f"--host {host}: listening beyond this machine needs a bearer token (--token-file FILE) or --trusted-network "
            "to say every client on that network may use the server; or keep the default --host 127.0.0.1"
        )


def serve(
    specs: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    token_file: str | None = None,
    trusted_network: bool = False,
    precision: str | None = None,
    threads: int | None = None,
    access_log: bool = False,
    merge: bool | None = None,
) -> None:
    import uvicorn

    limits = limits or Limits()
    token = read_token(token_file)
    check_address(host, token, trusted_network)
    pairs = parse_specs(specs)  # every argument is checked before any model loads
    listener = bind(host, port)
    set_threads(threads)
    loader = SharedBases(precision)
    served = load_served(pairs, precision, merge, loader)
    # --no-merge: no run merged, at load or later
    budget = int(limits.merge_budget_mb * 2**20) if merge is not False else 0
    merged = MergedCopies(loader, budget) if budget else None
    app = create_app(served, limits, token, merged)
    # Everything loaded so far (models, tokenizers, vocabularies: hundreds of thousands of objects) lives as long as
    # the server. Left to the cyclic garbage collector, each full collection walks all of it and stops every thread
    # for a few hundred milliseconds while requests wait; frozen, a full collection only walks what requests made.
    gc.collect()
    gc.freeze()

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining()  # /ready turns 503 at once, so a load balancer stops sending
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured SIGTERM once it has drained, so the process would end as killed by it;
            # a server that stopped as asked and finished its requests has exited cleanly (0)
            if sig == signal.SIGTERM and sig in getattr(self, "_captured_signals", []):
                self._captured_signals.remove(sig)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=access_log,
        timeout_graceful_shutdown=limits.drain_seconds,
        lifespan="on",
    )
    bases = {(r.run.cfg.model.name, r.run.dtype) for r in served.values()}
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(
        f"serving {len(served)} run(s) on {len(bases)} base model(s) at {where} "
        f"({', '.join(served)}); API docs at {where}/docs; SIGTERM or Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    DrainingServer(config).run(sockets=[listener])


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the models load: a port in use fails at once, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio switches Nagle's algorithm off (TCP_NODELAY) only on sockets that say they
    # are TCP, and with it on every response that uvicorn writes in two parts waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        return sock
    except OSError as e:
        sock.close()
        raise LorafitError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pick another --port, or stop what uses it"
        ) from None
