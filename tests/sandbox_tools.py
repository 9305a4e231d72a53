"""A tool host for the sandbox tests (factory `tests.sandbox_tools:make`): each tool probes one
thing the sandbox must allow or deny."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from matrix_provider.sandbox.host import ToolError


class Tools:
    def __init__(self, start: int = 0):
        self.counter = start

    def call(self, name: str, arguments: dict[str, Any], requestor: str) -> str:
        tool = getattr(self, f"tool_{name}", None)
        if tool is None:
            raise ToolError(f"unknown tool {name!r}")
        return str(tool(**arguments))

    def tool_echo(self, text: str) -> str:
        print("a host's print must not reach the protocol")
        return text

    def tool_count(self) -> int:
        self.counter += 1
        return self.counter

    def tool_open_socket(self, port: int) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return "connected"

    def tool_write_file(self, path: str) -> str:
        Path(path).write_text("x")
        return f"wrote {path}"

    def tool_sleep(self, s: float) -> str:
        time.sleep(s)
        return "slept"

    def tool_detach_child(self) -> int:
        """A child in its own session (out of reach of the worker's process group) that keeps every
        inherited descriptor, the protocol's pipes too: what a tool starting a daemon leaves."""
        pid = os.fork()
        if pid == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        return pid

    def tool_burn_cpu(self) -> str:
        while True:
            pass


def make(**init: Any) -> Tools:
    return Tools(**init)
