"""One error hierarchy and one table mapping each error to its HTTP status and gRPC code.

Framework-free: the gRPC code is the name of a `grpc.StatusCode` member, resolved by the gRPC adapter.
Messages say what went wrong and what to do; they never carry tracebacks or file paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    """Machine-readable error codes: the `code` of a REST error body and the gRPC `lstm-error-code` trailer."""

    INVALID_INPUT = "invalid_input"
    MALFORMED_REQUEST = "malformed_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_IN_USE = "model_in_use"
    MODEL_LOAD_FAILED = "model_load_failed"
    SESSION_NOT_FOUND = "session_not_found"
    SESSION_EXISTS = "session_exists"
    SESSION_CORRUPT = "session_corrupt"
    SEQ_CONFLICT = "seq_conflict"
    SESSION_LIMIT = "session_limit"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"
    ROUTE_NOT_FOUND = "route_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"


@dataclass(frozen=True)
class ErrorSpec:
    """How one error code travels: HTTP status, gRPC status name, and whether clients should retry later."""

    http_status: int
    grpc_status: str
    retry_after: int | None = None  # seconds for a Retry-After header, when retrying later makes sense


ERROR_TABLE: dict[ErrorCode, ErrorSpec] = {
    ErrorCode.INVALID_INPUT: ErrorSpec(400, "INVALID_ARGUMENT"),
    ErrorCode.MALFORMED_REQUEST: ErrorSpec(400, "INVALID_ARGUMENT"),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorSpec(413, "RESOURCE_EXHAUSTED"),
    ErrorCode.MODEL_NOT_FOUND: ErrorSpec(404, "NOT_FOUND"),
    ErrorCode.MODEL_IN_USE: ErrorSpec(409, "FAILED_PRECONDITION"),
    ErrorCode.MODEL_LOAD_FAILED: ErrorSpec(400, "FAILED_PRECONDITION"),
    ErrorCode.SESSION_NOT_FOUND: ErrorSpec(404, "NOT_FOUND"),
    ErrorCode.SESSION_EXISTS: ErrorSpec(409, "ALREADY_EXISTS"),
    ErrorCode.SESSION_CORRUPT: ErrorSpec(500, "DATA_LOSS"),
    ErrorCode.SEQ_CONFLICT: ErrorSpec(409, "ABORTED"),
    ErrorCode.SESSION_LIMIT: ErrorSpec(429, "RESOURCE_EXHAUSTED", retry_after=1),
    ErrorCode.OVERLOADED: ErrorSpec(503, "UNAVAILABLE", retry_after=1),
    ErrorCode.UNAVAILABLE: ErrorSpec(503, "UNAVAILABLE", retry_after=1),
    ErrorCode.DEADLINE_EXCEEDED: ErrorSpec(504, "DEADLINE_EXCEEDED"),
    ErrorCode.MODEL_ERROR: ErrorSpec(500, "INTERNAL"),
    ErrorCode.INTERNAL: ErrorSpec(500, "INTERNAL"),
    ErrorCode.UNAUTHENTICATED: ErrorSpec(401, "UNAUTHENTICATED"),
    # NOTE: routing errors; gRPC answers an unknown method with UNIMPLEMENTED itself
    ErrorCode.ROUTE_NOT_FOUND: ErrorSpec(404, "UNIMPLEMENTED"),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorSpec(405, "UNIMPLEMENTED"),
}

INTERNAL_MESSAGE = "internal error; the server log has the details"


class ServeError(Exception):
    """Base of every error the service reports to clients."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def spec(self) -> ErrorSpec:
        return ERROR_TABLE[self.code]


class InvalidInputError(ServeError):
    code = ErrorCode.INVALID_INPUT


class MalformedRequestError(ServeError):
    code = ErrorCode.MALFORMED_REQUEST


class PayloadTooLargeError(ServeError):
    code = ErrorCode.PAYLOAD_TOO_LARGE

    @classmethod
    def over(cls, limit: int) -> PayloadTooLargeError:
        """The one message for an oversize request, whatever the transport."""
        return cls(f"request is larger than the {limit} byte limit; send fewer steps per call")


class ModelNotFoundError(ServeError):
    code = ErrorCode.MODEL_NOT_FOUND


class ModelInUseError(ServeError):
    code = ErrorCode.MODEL_IN_USE


class ModelLoadFailedError(ServeError):
    code = ErrorCode.MODEL_LOAD_FAILED


class SessionNotFoundError(ServeError):
    code = ErrorCode.SESSION_NOT_FOUND


class SessionExistsError(ServeError):
    code = ErrorCode.SESSION_EXISTS


class SessionCorruptError(ServeError):
    code = ErrorCode.SESSION_CORRUPT


class SeqConflictError(ServeError):
    code = ErrorCode.SEQ_CONFLICT


class SessionLimitError(ServeError):
    code = ErrorCode.SESSION_LIMIT


class OverloadedError(ServeError):
    code = ErrorCode.OVERLOADED


class UnavailableError(ServeError):
    code = ErrorCode.UNAVAILABLE


class DeadlineExceededError(ServeError):
    code = ErrorCode.DEADLINE_EXCEEDED


class ModelError(ServeError):
    code = ErrorCode.MODEL_ERROR


class InternalError(ServeError):
    code = ErrorCode.INTERNAL


class UnauthenticatedError(ServeError):
    code = ErrorCode.UNAUTHENTICATED


class RouteNotFoundError(ServeError):
    code = ErrorCode.ROUTE_NOT_FOUND


class MethodNotAllowedError(ServeError):
    code = ErrorCode.METHOD_NOT_ALLOWED


def as_serve_error(exc: BaseException) -> ServeError:
    """Our own errors pass through; anything else becomes a generic internal error (no details leak)."""
    return exc if isinstance(exc, ServeError) else InternalError(INTERNAL_MESSAGE)
