"""Shared fixtures: real S3 servers (moto, JuiceFS gateway) started once per session, a fresh bucket
per test, and `store`, one ready `Storage` per backend so backend tests run against all three.

Servers start lazily: a run that needs no S3 server starts none.

Every test is exactly one of `unit` (in-process logic, seconds for all of them), `integration` (real
servers, inotify, subprocesses, signals) or `slow` (frameworks, install, demo, multi-GiB files): a
module says which with `KIND = "..."`, a test may say otherwise with its own mark, and a test that
reaches a real S3 server is `integration` whatever its module says. Select with `-m unit` or
`-m "not slow"`; a test of no kind is a collection error.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import nobody
import pytest
import servers
from servers import S3Bucket, S3Server

from daemon.storage import Storage
from daemon.storage.local import LocalStorage
from daemon.storage.s3 import S3Storage

# A suite started in a shell's background inherits SIGINT ignored: the tests of Ctrl-C (a real
# SIGINT to this process) would then wait forever for an interruption that never comes.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

S3_PREFIX = servers.S3_PREFIX
KINDS = ("unit", "integration", "slow")
_SERVER_FIXTURES = {"moto_server", "juicefs_server", "moto_bucket", "juicefs_bucket", "s3_bucket", "make_s3_store"}


def _reaches_a_server(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool(_SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))) or bool(
        {"moto", "juicefs"} & {v for v in params.values() if isinstance(v, str)}
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = []
    for item in items:
        # A test's own mark, else its module's KIND (not pytestmark: -m would see both).
        own = [m.name for m in item.iter_markers() if m.name in KINDS]
        kind = own[0] if own else getattr(getattr(item, "module", None), "KIND", None)
        if kind not in KINDS:
            unmarked.append(item.nodeid)
            continue
        if kind == "unit" and _reaches_a_server(item):
            kind = "integration"
        if kind not in own:
            item.add_marker(kind)
    if unmarked:
        raise pytest.UsageError("tests without a unit/integration/slow mark: " + ", ".join(unmarked[:10]))


@pytest.fixture(scope="session", autouse=True)
def _checkout_reachable_by_nobody() -> Iterator[None]:
    """Tests that run ckptd as nobody need to reach this checkout (see tests/nobody.py)."""
    with nobody.checkout_reachable():
        yield


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    proc = servers.start_moto(tmp_path_factory.mktemp("moto"))
    yield proc.server
    proc.stop()


@pytest.fixture(scope="session")
def juicefs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    proc = servers.start_juicefs(tmp_path_factory.mktemp("juicefs"))
    yield proc.server
    proc.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No AWS configuration of this machine (profiles, endpoints, credentials) leaks into a test."""
    for name in servers.aws_vars_to_remove():
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in servers.isolated_aws_env().items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@contextlib.contextmanager
def fresh_bucket(server: S3Server, env: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A new, empty bucket, with the server's credentials in the environment (the SDK chain)."""
    for name, value in server.env().items():
        env.setenv(name, value)
    bucket = S3Bucket(server, servers.unique_bucket())
    bucket.client.create_bucket(Bucket=bucket.name)
    yield bucket
    servers.empty_and_delete_bucket(bucket.client, bucket.name)


def server_for(request: pytest.FixtureRequest, name: str) -> S3Server:
    return request.getfixturevalue(f"{name}_server")


@pytest.fixture(params=["moto", "juicefs"])
def s3_bucket(request: pytest.FixtureRequest, aws_env: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    with fresh_bucket(server_for(request, request.param), aws_env) as bucket:
        yield bucket


@pytest.fixture
def moto_bucket(moto_server: S3Server, aws_env: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    with fresh_bucket(moto_server, aws_env) as bucket:
        yield bucket


@pytest.fixture
def juicefs_bucket(juicefs_server: S3Server, aws_env: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    with fresh_bucket(juicefs_server, aws_env) as bucket:
        yield bucket


@pytest.fixture
async def make_s3_store(s3_bucket: S3Bucket) -> AsyncIterator[Callable[..., S3Storage]]:
    """Factory for S3 stores on this test's bucket (any prefix or options); all closed afterwards."""
    made: list[S3Storage] = []

    def make(prefix: str = S3_PREFIX, **options: Any) -> S3Storage:
        made.append(s3_bucket.storage(prefix, **options))
        return made[-1]

    yield make
    for store in made:
        await store.close()


@pytest.fixture(params=["local", "moto", "juicefs"])
async def store(request: pytest.FixtureRequest, tmp_path, aws_env) -> AsyncIterator[Storage]:
    """The same backend test, against a local directory, moto and the JuiceFS gateway."""
    if request.param == "local":
        async with LocalStorage(tmp_path / "store") as local:
            yield local
        return
    with fresh_bucket(server_for(request, request.param), aws_env) as bucket:
        async with bucket.storage() as s3:
            yield s3
