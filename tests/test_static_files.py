"""Static files under ASGI: served by the async WhiteNoise middleware, chunk by chunk."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

from django.conf import settings
from django.test import RequestFactory, override_settings

from config.static import AsyncWhiteNoiseMiddleware

SCRIPT = "js/topup-status.js"


@override_settings(WHITENOISE_USE_FINDERS=True, WHITENOISE_AUTOREFRESH=True)
def test_a_static_file_streams_asynchronously_and_whole():
    async def page(request):  # never reached for a static path
        raise AssertionError(request.path)

    middleware = AsyncWhiteNoiseMiddleware(page)
    request = RequestFactory().get(f"/static/{SCRIPT}")

    async def fetch() -> tuple[object, bytes]:
        response = await middleware(request)
        body = b"".join([chunk async for chunk in response.streaming_content])
        return response, body

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Django warns when it must read a file whole
        response, body = asyncio.run(fetch())
    assert response.status_code == 200
    assert response.is_async
    assert body == (Path(settings.BASE_DIR) / "static" / SCRIPT).read_bytes()
