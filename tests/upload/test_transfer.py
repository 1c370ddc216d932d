"""Pure rules of the transfer step: part sizes and retry-or-give-up."""

from __future__ import annotations

import pytest

from daemon.storage.retry import backoff, should_retry
from daemon.storage import StorageError
from daemon.upload.transfer import MAX_PARTS, part_size_for

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    "size, configured, part",
    [
        (100 * MiB, None, 16 * MiB),
        (100 * MiB, 64 * MiB, 64 * MiB),
        (TiB, None, 105 * MiB),
        (TiB, 8 * MiB, 105 * MiB),
        (5 * TiB, None, 525 * MiB),
    ],
)
def test_part_size_table(size, configured, part):
    assert part_size_for(size, configured) == part
    assert -(-size // part) <= MAX_PARTS


@pytest.mark.parametrize(
    "attempt, rand, delay",
    [(1, 0.0, 0.1), (1, 1.0, 0.2), (3, 0.5, 0.6), (20, 0.0, 10.0), (20, 1.0, 20.0)],
)
def test_backoff_table(attempt, rand, delay):
    assert backoff(attempt, rand) == pytest.approx(delay)


@pytest.mark.parametrize(
    "code, deadline, retry",
    [
        ("AccessDenied", None, False),
        ("SlowDown", None, True),
        ("SlowDown", 100.0, True),  # now 10 + delay 1 < 100
        ("SlowDown", 10.5, False),  # now 10 + delay 1 >= 10.5
    ],
)
def test_should_retry_table(code, deadline, retry):
    assert should_retry(StorageError("put", "k", code, "m"), 1.0, 10.0, deadline) is retry
