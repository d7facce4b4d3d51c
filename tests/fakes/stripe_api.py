"""A stand-in for Stripe's API on 127.0.0.1, and webhook events signed as Stripe signs them.

`StripeFake` is a real HTTP server in a thread. It answers `POST /v1/checkout/sessions`
as Stripe does (form-encoded parameters in, a Checkout Session object out, the same
session again for a repeated Idempotency-Key), checks the bearer key, records every
request, and fails on request::

    with StripeFake() as fake:
        ...  # settings.STRIPE_API_BASE = fake.base_url
        fake.fail_status = 500  # the next requests get Stripe's error body
        fake.requests[-1].params["line_items[0][price_data][unit_amount]"]

`signed_event(...)` builds a webhook body and its `Stripe-Signature` header,
`t=<unix time>,v1=<HMAC-SHA256(secret, "<t>.<body>")>`, computed here rather than by the
stripe library, so the library's verification is checked against Stripe's documented
scheme. Nothing here imports real200.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

SECRET_KEY = "sk_test_real200_fake"
WEBHOOK_SECRET = "whsec_real200_test_secret"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    params: dict[str, str]  # Stripe's bracketed form keys, as sent


@dataclass
class StripeFake:
    secret_key: str = SECRET_KEY
    fail_status: int | None = None
    requests: list[Request] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    _by_idempotency_key: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> StripeFake:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                request = Request(
                    method="POST",
                    path=self.path,
                    headers={name.lower(): value for name, value in self.headers.items()},
                    params=dict(parse_qsl(body, keep_blank_values=True)),
                )
                fake.requests.append(request)
                status, answer = fake._answer(request)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_{secrets.token_hex(8)}")
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for the loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _answer(self, request: Request) -> tuple[int, dict[str, Any]]:
        if request.headers.get("authorization") != f"Bearer {self.secret_key}":
            return 401, _error("invalid_request_error", "Invalid API Key provided")
        if self.fail_status is not None:
            return self.fail_status, _error("api_error", "Something went wrong on Stripe's end")
        if request.path != "/v1/checkout/sessions":
            return 404, _error("invalid_request_error", f"Unrecognized request URL {request.path}")
        replayed = self._by_idempotency_key.get(request.headers.get("idempotency-key", ""))
        if replayed is not None:
            return 200, self.sessions[replayed]
        session = _session_from(request.params)
        self.sessions[session["id"]] = session
        if request.headers.get("idempotency-key"):
            self._by_idempotency_key[request.headers["idempotency-key"]] = session["id"]
        return 200, session


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def _session_from(params: dict[str, str]) -> dict[str, Any]:
    session_id = f"cs_test_{secrets.token_hex(16)}"
    unit = int(params["line_items[0][price_data][unit_amount]"])
    quantity = int(params.get("line_items[0][quantity]", "1"))
    metadata = {
        key.removeprefix("metadata[").removesuffix("]"): value
        for key, value in params.items()
        if key.startswith("metadata[")
    }
    return {
        "id": session_id,
        "object": "checkout.session",
        "mode": params.get("mode"),
        "amount_subtotal": unit * quantity,
        "amount_total": unit * quantity,
        "currency": params["line_items[0][price_data][currency]"],
        "client_reference_id": params.get("client_reference_id"),
        "metadata": metadata,
        "payment_status": "unpaid",
        "status": "open",
        "success_url": params.get("success_url"),
        "cancel_url": params.get("cancel_url"),
        "url": f"https://checkout.stripe.test/c/pay/{session_id}",
        "livemode": False,
    }


def stripe_signature(payload: bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    """The `Stripe-Signature` header Stripe sends with `payload`."""
    timestamp = int(time.time()) if at is None else at
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def event_payload(
    session: dict[str, Any], *, event_type: str = "checkout.session.completed", **changes: Any
) -> bytes:
    """A webhook body for `session`, with `changes` applied to the session (a paid
    completion unless told otherwise)."""
    obj = {**session, "status": "complete", "payment_status": "paid", **changes}
    event = {
        "id": f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": "2025-01-01",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "type": event_type,
        "data": {"object": obj},
    }
    return json.dumps(event).encode()


def signed_event(
    session: dict[str, Any], *, secret: str = WEBHOOK_SECRET, **kwargs: Any
) -> tuple[bytes, str]:
    payload = event_payload(session, **kwargs)
    return payload, stripe_signature(payload, secret)
