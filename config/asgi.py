"""The ASGI application: the /v1 API and everything else, each with its own middleware.

Django's middleware (MiddlewareMixin) costs two thread hops per middleware per request in
an async stack. The dashboard needs the whole stack; the API, which authenticates by key,
needs only the security headers. So /v1 requests go to a second Django handler whose
chain is settings.API_MIDDLEWARE; both share the URLconf, the settings and the process.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

pages = get_asgi_application()  # sets Django up

from django.conf import settings  # noqa: E402 - after setup
from django.core.handlers.asgi import ASGIHandler  # noqa: E402


class ApiHandler(ASGIHandler):
    async def __call__(self, scope, receive, send) -> None:
        # Django runs each request in a ThreadSensitiveContext, which starts a thread of the
        # request's own for its synchronous steps: a thread per open stream. The API runs
        # its database steps in the shared worker threads instead (config/asyncdb.py); the
        # few brief steps left to Django (request signals, closing the response) run on
        # the process's one thread for synchronous code.
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        # BaseHandler builds its chain from settings.MIDDLEWARE; build this one from the
        # API's list instead, once, at start-up.
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async=is_async)
        finally:
            settings.MIDDLEWARE = full


api = ApiHandler()


async def lifespan(receive, send) -> None:
    """Start-up needs nothing; at shutdown, close this process's pooled clients (the
    upstreams', the rate limiter's, the database's async one) instead of leaving their
    sockets to the exit."""
    from apps.gateway.calls import upstream_clients_close
    from apps.keys.limits import counters_close
    from config.asyncdb import fetch_pools_close

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await upstream_clients_close()
            await counters_close()
            await fetch_pools_close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"].startswith("/v1/"):
        await api(scope, receive, send)
    else:
        await pages(scope, receive, send)
