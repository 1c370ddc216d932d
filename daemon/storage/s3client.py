"""The S3 client's configuration, and how its failures become `StorageError`s.

botocore is told to compute no checksums itself (the backend computes the configured one in a
thread) and to retry once at most: backoff lives in the upload engine, which knows the deadline.
"""

from __future__ import annotations

import functools
import re

import aiohttp
from aiobotocore.config import AioConfig
from botocore import exceptions as bx
from botocore.loaders import Loader, create_loader

from daemon.storage.errors import StorageError
from daemon.storage.options import S3Options

# Endpoint/connect-timeout errors derive from bx.ConnectionError; closed/read-timeout from
# bx.HTTPClientError; raw aiohttp and timeout errors can surface while a body is being read.
_NETWORK_ERRORS = (bx.ConnectionError, bx.HTTPClientError, aiohttp.ClientError, TimeoutError, ConnectionError)
_QUERY = re.compile(r"\?[^\s\"'>]*")  # upload ids and signatures stay out of logs


@functools.cache
def shared_loader() -> Loader:
    """Parsing the S3 model and endpoint rules costs ~0.15 s per session; parse them once."""
    return create_loader()


def client_config(options: S3Options) -> AioConfig:
    signing = {"on": True, "off": False}.get(options.payload_signing, options.checksum == "none")
    return AioConfig(
        region_name=options.region or "us-east-1",
        signature_version="s3v4",  # presigned URLs too: SigV2 is gone from newer regions
        s3={"addressing_style": options.addressing_style, "payload_signing_enabled": signing},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # One quick retry for a stale pooled connection; real backoff lives in the upload engine.
        retries={"mode": "standard", "total_max_attempts": 2},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=options.max_connections,
        # Load the big S3 service model in a thread rather than on the event loop.
        warm_up_loader_caches=True,
    )


def translate(op: str, key: str, exc: Exception) -> StorageError:
    """Turn any client-side failure into a StorageError without leaking query strings."""
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(err.get("Code") or status or "Unknown")
        code = {"403": "AccessDenied", "404": "NotFound"}.get(code, code)
        message = str(err.get("Message") or code)
        return StorageError(op, key, code, _QUERY.sub("", message), http_status=status)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StorageError(op, key, "NoCredentials", "no AWS credentials found", transient=False)
    if isinstance(exc, bx.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return StorageError(op, key, "TLSVerifyFailed", _QUERY.sub("", str(exc)), transient=False)
    if isinstance(exc, _NETWORK_ERRORS):
        message = _QUERY.sub("", str(exc) or type(exc).__name__)
        return StorageError(op, key, "NetworkError", message, transient=True)
    if isinstance(exc, bx.ParamValidationError):
        return StorageError(op, key, "InvalidArgument", str(exc), transient=False)
    return StorageError(op, key, type(exc).__name__, _QUERY.sub("", str(exc)))
