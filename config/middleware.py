"""Middleware of the /v1 API's own handler (see config/asgi.py)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponseBase
from django.middleware.security import SecurityMiddleware


class InlineSecurityMiddleware(SecurityMiddleware):
    """SecurityMiddleware (HTTPS redirect, HSTS and the other security headers) without
    the two thread hops Django's MiddlewareMixin takes in an async stack: its hooks do no
    I/O, so they run on the event loop."""

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.process_request(request)
        response = response or await self.get_response(request)
        return self.process_response(request, response)
