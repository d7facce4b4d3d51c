"""The ASGI application: the /v1 API and everything else, each with its own middleware.

Django's middleware (MiddlewareMixin) costs two thread hops per middleware per request in
an async stack. The dashboard needs the whole stack; the API, which authenticates by key,
needs only the security headers. So /v1 requests go to a second Django handler whose
chain is settings.API_MIDDLEWARE; both share the URLconf, the settings and the process.
"""

import asyncio
import contextlib
import gc
import logging
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

pages = get_asgi_application()  # sets Django up

from django.conf import settings  # noqa: E402 - after setup
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.http import HttpRequest  # noqa: E402
from django.urls import set_script_prefix  # noqa: E402

from apps.gateway.views import EventStream, LastPart  # noqa: E402

logger = logging.getLogger(__name__)


# A stream still open this long after the longest time a call may take is ended by the
# handler. The relay ends a call past its time at the next upstream event; one waiting to
# write to a client that stopped reading sees no event, and its hold must not outlive it.
OVERDUE_GRACE_SECONDS = 5.0


class ApiHandler(ASGIHandler):
    async def __call__(self, scope, receive, send) -> None:
        # Django runs each request in a ThreadSensitiveContext, which starts a thread of the
        # request's own for its synchronous steps: a thread per open stream. The API runs
        # its database steps in the shared worker threads instead (config/asyncdb.py), and
        # `handle` below leaves Django no synchronous step of its own.
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        """Django's ASGIHandler.handle (5.2) without the request signals: `request_started`,
        sent by a hop to the process's thread for synchronous code, and `request_finished`,
        sent when the response is closed (another hop). Their receivers close or reset what
        a request holds in its thread: database connections, cache clients, the URLconf. An
        API request holds none in this one: its database steps close their connections in
        the worker threads, its hold and settlement use the event loop's async pool. Nor
        does an API response hold anything to close (no file; the relay closes itself), so
        it is not closed: that would only send `request_finished`, whose receivers look up
        every cache and database alias in the loop's context (2 % of a stream's CPU). At
        one call at a time the hops were a sixth of a call's CPU and 0.6 ms of its latency
        (bench: one worker, c=1: 3.8 ms of CPU and 5.4 ms before, 3.2 and 4.8)."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            set_script_prefix(get_script_prefix(scope))
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                await self.send_response(error_response, send)
                return
            await self._respond_unless_disconnected(request, receive, send)
        finally:
            body_file.close()

    async def _respond_unless_disconnected(self, request: HttpRequest, receive, send) -> None:
        """Run the view and send its response, cancelling it if the client disconnects
        first (as Django does: the view sees a CancelledError at its current await).

        The view runs in this task, with only the listener for a disconnect in a task of
        its own: a task for the view too (Django's way) cost a turn of the event loop
        before it started, which under load is milliseconds of every call's latency.

        A streamed response still being sent `OVERDUE_GRACE_SECONDS` after the longest
        time a call may take is cancelled the same way: its relay sees that it ran past
        its time, and settles it so."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        responding = asyncio.current_task()
        client_left = ran_over = False

        def cancel_the_response(listening: asyncio.Task) -> None:
            nonlocal client_left
            if not listening.cancelled() and isinstance(listening.exception(), RequestAborted):
                client_left = True
                responding.cancel()

        def end_the_overdue_stream() -> None:
            nonlocal ran_over
            ran_over = True
            logger.warning("a stream still open past the longest call time was ended")
            responding.cancel()

        listening = asyncio.create_task(self.listen_for_disconnect(receive))
        listening.add_done_callback(cancel_the_response)
        response = overdue = None
        try:
            response = await self.run_get_response(request)
            if response.streaming:
                ends_at = arrived + settings.GATEWAY_MAX_CALL_SECONDS + OVERDUE_GRACE_SECONDS
                overdue = loop.call_at(ends_at, end_the_overdue_stream)
            await self.send_response(response, send)
        except asyncio.CancelledError:
            if not (client_left or ran_over):
                raise  # the server is stopping
            responding.uncancel()
        finally:
            if overdue is not None:
                overdue.cancel()
            listening.remove_done_callback(cancel_the_response)
            listening.cancel()
            with contextlib.suppress(RequestAborted, asyncio.CancelledError):
                await listening
            if response is not None and response.streaming:
                # send_response closes the body it iterated; this closes one it never
                # reached (cancelled while writing the headers), so that its cleanup runs:
                # a stream's relay settles its call there. Closing a closed one is a no-op.
                await aiter(response).aclose()

    async def send_response(self, response, send) -> None:
        """Django's send_response, leaner for an event stream: each part goes out as it
        is (Django runs every part through a generator that splits it into 64 KiB
        pieces; a stream's parts are a few hundred bytes), and the relay's `LastPart`
        goes out with the end-of-body marker, in one write."""
        if not isinstance(response, EventStream):
            await super().send_response(response, send)
            return
        headers = [
            (name.encode("ascii"), value.encode("latin1")) for name, value in response.items()
        ]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        ended = False
        async with contextlib.aclosing(aiter(response)) as parts:
            async for part in parts:
                ended = type(part) is LastPart
                await send({"type": "http.response.body", "body": part, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body"})

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
    """At start-up, exempt what is loaded from the garbage collector. At shutdown, let
    the settlements that outlive their responses finish, then close this process's pooled
    clients (the upstreams', the rate limiter's, the database's async one) instead of
    leaving their sockets to the exit."""
    from apps.gateway.calls import late_settlements_finish, upstream_clients_close
    from apps.keys.limits import counters_close
    from config.asyncdb import fetch_pools_close

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # Django, the apps and their libraries are a hundred thousand objects that live
            # as long as the process. Each full pass of the cyclic collector walked them
            # all: 45 ms during which no stream moved. Frozen, they are never walked again.
            gc.freeze()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await late_settlements_finish()
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
