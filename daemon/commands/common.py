"""What the long-running commands share: the store, the status server, the log context."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import structlog

from daemon import __version__, metrics
from daemon.config import Config
from daemon.storage import S3Options, Storage, open_storage

if TYPE_CHECKING:
    from daemon.serve import Health

log = structlog.get_logger()


def storage_for(c: Config) -> Storage:
    return open_storage(
        c.storage,
        S3Options(
            endpoint_url=c.s3_endpoint_url,
            region=c.s3_region,
            addressing_style=c.s3_addressing_style,
            checksum=c.s3_checksum,
            payload_signing=c.s3_payload_signing,
            sse=c.s3_sse,
            sse_kms_key_id=c.s3_sse_kms_key_id,
            ca_bundle=c.s3_ca_bundle,
            max_connections=c.s3_max_connections,
        ),
    )


def identify(c: Config, mode: str) -> dict:
    """Bind who we are to every log line and to the info metric."""
    identity = {"project": c.project, "job_id": c.job_id, "rank": c.node_rank, "mode": mode}
    structlog.contextvars.bind_contextvars(project=c.project, job_id=c.job_id, rank=c.node_rank)
    metrics.INFO.labels(__version__, c.project, c.job_id, str(c.node_rank)).set(1)
    return identity


@contextlib.asynccontextmanager
async def serving(c: Config, mode: str) -> AsyncIterator[Health | None]:
    """Serve /metrics and health for the duration; yields None when the address cannot be used
    (the caller exits 2: a configuration error, found before anything started)."""
    from daemon.serve import Health, ServeError, Server  # aiohttp.web: not on restore's start-up path

    health = Health(identify(c, mode))
    server = Server(health)
    try:
        await server.start(*c.metrics_addr)
    except ServeError as e:
        log.error("metrics address unusable", error=str(e))
        yield None
        return
    try:
        yield health
    finally:
        await server.stop()
