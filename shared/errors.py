"""One error family for everything a client can be told; the HTTP layer turns it into OpenAI's envelope."""

from __future__ import annotations

from typing import Any


class FnserveError(Exception):
    """Base of every error fnserve reports to a client. Subclasses fix the status and the OpenAI type."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def to_dict(self, request_id: str | None = None) -> dict[str, Any]:
        """OpenAI's error envelope (with the request's id, which the X-Request-ID header carries too)."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}


class InvalidRequestError(FnserveError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(FnserveError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(FnserveError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class ModelNotFoundError(FnserveError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class NotFoundError(FnserveError):
    status_code = 404
    error_type = "invalid_request_error"


class RequestTooLargeError(FnserveError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(FnserveError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class OverloadedError(FnserveError):
    status_code = 503
    error_type = "server_overloaded"
    default_code = "server_overloaded"


class ModelLoadError(FnserveError):
    """A configured model could not be found or loaded; the message names everything that was tried."""

    status_code = 503
    error_type = "server_error"
    default_code = "model_unavailable"


class BackendUnavailableError(FnserveError):
    """A backend was named in the settings but cannot run on this machine."""

    status_code = 503
    error_type = "server_error"
    default_code = "backend_unavailable"
