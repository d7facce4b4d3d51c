"""WhiteNoise, made async-capable.

WhiteNoise's middleware is sync-only. In Django's async stack a sync-only middleware
costs two thread hops on EVERY request (into a thread for it, and back to the event loop
for everything inside it), and that thread stays blocked while the view awaits: the API,
which never serves a static file, paid that on each call. This subclass answers static
paths itself (a dictionary lookup, the file opened in a worker thread) and awaits the
rest of the stack directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase
from whitenoise.middleware import WhiteNoiseMiddleware


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    sync_capable = False
    async_capable = True

    def __init__(self, get_response) -> None:
        if not iscoroutinefunction(get_response):
            raise TypeError("AsyncWhiteNoiseMiddleware needs an async stack (ASGI)")
        super().__init__(get_response)
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if not request.path_info.startswith(self.static_prefix):
            return await self.get_response(request)
        if self.autorefresh:
            static_file = await sync_to_async(self.find_file, thread_sensitive=False)(
                request.path_info
            )
        else:
            static_file = self.files.get(request.path_info)
        if static_file is None:
            return await self.get_response(request)
        response = await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        if response.streaming and not response.is_async:
            # A file's chunks come from a blocking read: under ASGI Django would read the
            # whole file in a thread first (with a warning); read each chunk in one instead.
            response.streaming_content = _read_in_thread(iter(response.streaming_content))
        return response


async def _read_in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    read = sync_to_async(next, thread_sensitive=False)
    while (chunk := await read(chunks, None)) is not None:
        yield chunk
