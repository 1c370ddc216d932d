"""Storage errors and the retry-or-give-up rule.

Every failure of a backend becomes one `StorageError` carrying the operation, the key and the
store's error code, and a verdict: transient (retry with backoff) or permanent (report at once).
"""

from __future__ import annotations

# S3 error codes that mean "the request was fine, the store was not, try again".
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",  # usually a clock being corrected; retrying is cheap
        "RequestLimitExceeded",
        "TooManyRequests",
        "OperationAborted",  # a conflicting operation on the same bucket/key is in progress
        "XMinioServerNotInitialized",
        "XMinioStorageFull",  # space may be freed; a permanent verdict would lose the checkpoint
        "NetworkError",  # our own code for connection resets, DNS and timeouts
    }
)

MISSING_CODES = frozenset({"NoSuchKey", "NotFound"})

# S3 error codes that retrying cannot fix.
PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "NoSuchBucket",
        "InvalidBucketName",
        "AccountProblem",
        "KMS.AccessDeniedException",
        "KMS.DisabledException",
        "KMS.NotFoundException",
        "KMSAccessDenied",
        "NoCredentials",  # our own code: the credential chain found nothing
        "InvalidArgument",
        "InvalidRequest",
        "NotImplemented",
        "MethodNotAllowed",
        "EntityTooLarge",
    }
)


def is_transient(code: str, http_status: int | None) -> bool:
    """Decide whether a failed request is worth retrying.

    Known codes decide first; unknown codes fall back to the HTTP status class.

    | code                         | http_status | transient |
    |------------------------------|-------------|-----------|
    | SlowDown, InternalError, ... | any         | yes       |
    | NetworkError                 | None        | yes       |
    | AccessDenied, NoSuchBucket.. | any         | no        |
    | unknown                      | 5xx         | yes       |
    | unknown                      | 429, 408    | yes       |
    | unknown                      | other 4xx   | no        |
    | unknown                      | None        | yes       |

    BadDigest and friends (the bytes were corrupted in flight) are unknown codes with a 400 and
    so permanent for this request: the caller re-reads the file and sends it again, which is a
    new request, not a retry of the same bytes.
    """
    if code in TRANSIENT_CODES:
        return True
    if code in PERMANENT_CODES:
        return False
    if http_status is None:
        return True
    return http_status >= 500 or http_status in (408, 429)


class StorageError(Exception):
    """A storage operation failed. `code` is the store's error code (bounded, fit for a label)."""

    def __init__(
        self,
        op: str,
        key: str,
        code: str,
        message: str,
        *,
        http_status: int | None = None,
        transient: bool | None = None,
    ) -> None:
        self.op = op
        self.key = key
        self.code = code
        self.message = message
        self.http_status = http_status
        self.transient = is_transient(code, http_status) if transient is None else transient
        super().__init__(f"{op} {key!r}: {code}: {message}")

    @property
    def missing(self) -> bool:
        """The object is not there (S3 says NoSuchKey for GET, a bare 404 NotFound for HEAD)."""
        return self.code in MISSING_CODES
