"""The gateway's one exception hierarchy, turned into OpenAI's error body in one place."""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpResponse


class GatewayError(Exception):
    """An answer other than success. Subclasses fix the status, type and code."""

    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **self.extra,
            }
        }

    def response(self) -> HttpResponse:
        response = HttpResponse(
            orjson.dumps(self.body()), status=self.status, content_type="application/json"
        )
        for name, value in self.headers.items():
            response[name] = value
        return response


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_api_key"
    code = "invalid_api_key"


class InsufficientQuota(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class ServiceBusy(GatewayError):
    """real200 itself is overloaded (no database connection came free in time)."""

    status = 503
    code = "server_busy"


class UpstreamBadGateway(GatewayError):
    status = 502
    code = "upstream_error"


class UpstreamOverloaded(GatewayError):
    status = 503
    code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "upstream_timeout"


class UpstreamRefused(GatewayError):
    """The upstream refused the request itself; its status reaches the customer."""

    type = "invalid_request_error"
    code = "upstream_rejected"

    def __init__(self, message: str, *, status: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status


def sse_error_event(error: GatewayError) -> bytes:
    """A failure after streaming began: one `data: {"error": …}` event, then the end."""
    return b"data: " + orjson.dumps(error.body()) + b"\n\n"
