"""Local peers for alert delivery: an HTTP receiver playing webhook, WeCom and DingTalk, and an SMTP server.

Both run on their own thread with their own event loop, so a test can drive the collector's loop (or a
click command's ``asyncio.run``) against them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web


@dataclass
class Hit:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class WebhookReceiver:
    """Answers like the real receivers: ``/hook`` any 2xx, ``/wecom`` and ``/dingtalk`` errcode JSON.

    ``status`` forces an HTTP status, ``delay_s`` a slow answer; DingTalk's signature is checked against
    ``dingtalk_secret`` and a bad one refused with errcode 310000, as DingTalk does.
    """

    status: int = 200
    delay_s: float = 0.0
    dingtalk_secret: str | None = None
    hits: list[Hit] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("receiver did not start")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/{kind}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = int(self._runner.addresses[0][1])
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        hit = Hit(request.path, dict(request.query), dict(request.headers), body)
        self.hits.append(hit)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.Response(status=self.status, text="server error")
        kind = request.match_info["kind"]
        if kind == "dingtalk" and self.dingtalk_secret is not None:
            ts = request.query.get("timestamp", "")
            mac = hmac.new(
                self.dingtalk_secret.encode(), f"{ts}\n{self.dingtalk_secret}".encode(), hashlib.sha256
            )
            fresh = ts.isdigit() and abs(int(ts) - time.time() * 1000) < 3_600_000
            if not fresh or request.query.get("sign") != base64.b64encode(mac.digest()).decode():
                return web.json_response({"errcode": 310000, "errmsg": "sign not match"})
        if kind in ("wecom", "dingtalk"):
            return web.json_response({"errcode": 0, "errmsg": "ok"})
        return web.Response(status=204)

    def wait_hits(self, n: int, timeout: float = 10.0) -> list[Hit]:
        deadline = time.monotonic() + timeout
        while len(self.hits) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.hits)

    def texts(self) -> list[str]:
        """The message text of each hit, whatever the format."""
        out = []
        for h in self.hits:
            b = h.body
            out.append(
                b["text"]["content"] if isinstance(b.get("text"), dict) else b.get("text", json.dumps(b))
            )
        return out

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class SmtpServer:
    """aiosmtpd with STARTTLS required before AUTH, one login accepted; received mails in ``mails``."""

    def __init__(self, certs: Path, port: int, user: str, password: str) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.mails: list[tuple[str, list[str], bytes]] = []
        self.logins: list[str] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                outer.mails.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
                return "250 OK"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            ok = (
                isinstance(data, LoginPassword)
                and data.login == user.encode()
                and data.password == password.encode()
            )
            if ok:
                outer.logins.append(user)
            return AuthResult(success=ok)

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=port,
            tls_context=ctx,
            require_starttls=True,
            authenticator=authenticator,
            auth_required=True,
        )
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()
