"""Metrics and health over HTTP, served on the event loop: /metrics, /healthz, /readyz, /status.

Served by the loop that does the uploads, so an answer from /healthz proves the loop is
responsive; the heartbeat also measures how late the loop runs, for /status and /healthz.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon import __version__, metrics

HEARTBEAT = 0.5
MAX_LOOP_LAG = 5.0  # seconds late before /healthz reports the loop as stuck
log = structlog.get_logger()


class ServeError(Exception):
    """The listen address cannot be used (in use, not local, no permission)."""


class Reporter(Protocol):
    """What a running part (the uploader) tells the endpoints."""

    def not_ready(self) -> list[str]: ...

    def status(self) -> dict[str, Any]: ...


class Health:
    """What the endpoints report. Fed where things happen; read when a request comes."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity
        self.restore_done = False
        self.loop_lag = 0.0
        self.uploads: Reporter | None = None  # set once the upload engine exists
        self.trainer_running: Callable[[], bool] = lambda: False

    def not_ready(self) -> list[str]:
        reasons = [] if self.restore_done else ["restore not finished"]
        return reasons + (self.uploads.not_ready() if self.uploads is not None else [])

    def status(self) -> dict[str, Any]:
        return {
            **self.identity,
            "version": __version__,
            "ready": not self.not_ready(),
            "not_ready": self.not_ready(),
            "restore_done": self.restore_done,
            "trainer_running": self.trainer_running(),
            "loop_lag_seconds": round(self.loop_lag, 3),
            **(self.uploads.status() if self.uploads is not None else {}),
        }


async def heartbeat(health: Health) -> None:
    while True:
        start = time.monotonic()
        await asyncio.sleep(HEARTBEAT)
        health.loop_lag = max(0.0, time.monotonic() - start - HEARTBEAT)


def _app(health: Health) -> web.Application:
    async def metrics_page(_: web.Request) -> web.Response:
        body = generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        ok = health.loop_lag < MAX_LOOP_LAG
        return web.json_response(
            {"alive": ok, "loop_lag_seconds": round(health.loop_lag, 3)}, status=200 if ok else 503
        )

    async def readyz(_: web.Request) -> web.Response:
        reasons = health.not_ready()
        return web.json_response({"ready": not reasons, "not_ready": reasons}, status=503 if reasons else 200)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(health.status())

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    return app


class Server:
    def __init__(self, health: Health) -> None:
        self.health = health
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        runner = web.AppRunner(_app(self.health), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ServeError(
                f"cannot listen on {host}:{port} (metrics_addr, $CKPTD_METRICS_ADDR): {e.strerror}"
            ) from None
        self._runner = runner
        self.address = runner.addresses[0][:2]  # the real port when asked for port 0
        self._heartbeat = asyncio.create_task(heartbeat(self.health), name="heartbeat")
        log.info("serving metrics and health", address=f"{self.address[0]}:{self.address[1]}")
        return self.address

    async def stop(self) -> None:
        if self._heartbeat:
            self._heartbeat.cancel()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
