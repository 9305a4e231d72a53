"""A local OpenAI-compatible stand-in for Azure OpenAI and Gemini, recording what reaches it.

It answers every chat request with one JSON object that satisfies all natural_reasoning roles,
and can be told to refuse with a body that echoes the key, like careless upstreams do.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web

ANSWER = json.dumps({"reasoning": True, "score": 4, "question": "Why?", "answer": "Because.", "reasoning_": "x"})


@dataclass
class StandIn:
    port: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)
    refuse: bool = False
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(
            {
                "path": request.path,
                "query": request.query_string,
                "model": body.get("model", ""),
                **{k.lower(): v for k, v in request.headers.items()},
            }
        )
        if self.refuse:
            key = request.headers.get("api-key") or request.headers.get("Authorization", "")
            return web.json_response({"error": {"message": f"invalid key {key}"}}, status=401)
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    def start(self) -> StandIn:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)
        return self
