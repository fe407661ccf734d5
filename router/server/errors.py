"""OpenAI-shaped error responses.

Every error the router answers with has the body
``{"error": {"message", "type", "param", "code"}}`` so that OpenAI clients
surface the message unchanged. ``RouterError`` carries the HTTP status; handlers
raise it and one middleware turns it into the response.
"""

from __future__ import annotations

from aiohttp import web

# OpenAI's error "type" values by HTTP status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class RouterError(Exception):
    """An error answered to the client with ``status`` and OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": _TYPES.get(status, "error"),
                      "param": param, "code": code if code is not None else status}}
