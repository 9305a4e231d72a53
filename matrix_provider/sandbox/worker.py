"""The process inside a sandbox: `python -m matrix_provider.sandbox.worker [limits] <factory>`.

It sets its own resource limits before any host code runs, imports the factory's module (so a warm
spare is ready before a trajectory needs it), then answers JSON lines on stdin, one JSON line
`{"content": str, "error": bool}` on stdout per request:

    {"op": "init", "init": {...}}                                   builds the host: factory(**init)
    {"op": "call", "name": ..., "arguments": {...}, "requestor": ...}   runs a tool on it

A tool's exception is a result, never the worker's end. The protocol has the real stdout and
stdin to itself: the host's prints, logging and reads go to stderr and /dev/null.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from typing import Any, BinaryIO, TextIO

from matrix_provider.sandbox.host import ToolError, ToolHost, load_factory


def set_limits(cpu_seconds: int | None, memory_mb: int | None) -> None:
    """Hard limits too, so the host cannot raise them. CPU: SIGXCPU at the soft limit names the cause
    (at soft = hard the kernel sends a bare SIGKILL); SIGKILL a second later if it is handled."""
    limits = {resource.RLIMIT_CORE: (0, 0)}
    if cpu_seconds:
        limits[resource.RLIMIT_CPU] = (cpu_seconds, cpu_seconds + 1)
    if memory_mb:
        limits[resource.RLIMIT_AS] = (memory_mb << 20, memory_mb << 20)
    for kind, (soft, hard) in limits.items():
        ceiling = resource.getrlimit(kind)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(kind, (soft, hard))


def take_stdio() -> tuple[BinaryIO, TextIO]:
    """Private copies of stdin/stdout for the protocol; fds 0 and 1 become /dev/null and stderr."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    sys.stdout = sys.stderr
    return requests, replies


class Session:
    """One worker's host: built by `init`, then called until the worker is killed."""

    def __init__(self, factory: str):
        self.factory_name = factory
        self.host: ToolHost | None = None
        try:
            self.factory = load_factory(factory)
            self.load_error = ""
        except Exception as exc:  # reported on init: the pool turns it into the row's error
            self.load_error = f"tool host {factory!r} could not be loaded: {type(exc).__name__}: {exc}"

    def handle(self, request: dict[str, Any]) -> tuple[str, bool]:
        """(content, error) of one request."""
        op = request.get("op")
        if op == "init":
            if self.load_error:
                return self.load_error, True
            try:
                self.host = self.factory(**request.get("init", {}))
            except Exception as exc:
                return f"tool host {self.factory_name!r} could not be built: {type(exc).__name__}: {exc}", True
            return "", False
        if op == "call":
            name = str(request.get("name"))
            if self.host is None:
                return f"{name}: the sandbox has no tool host (no init before the call)", True
            try:
                return str(self.host.call(name, request.get("arguments") or {}, str(request.get("requestor")))), False
            except ToolError as exc:
                return str(exc), True
            except Exception as exc:
                return f"{name}: {type(exc).__name__}: {exc}", True
        return f"unknown sandbox request op {op!r}", True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m matrix_provider.sandbox.worker")
    parser.add_argument("--cpu-seconds", type=int)
    parser.add_argument("--memory-mb", type=int)
    parser.add_argument("factory", help="package.module:callable building the tool host")
    args = parser.parse_args(argv)
    requests, replies = take_stdio()
    set_limits(args.cpu_seconds, args.memory_mb)
    session = Session(args.factory)
    for line in requests:
        try:
            content, error = session.handle(json.loads(line))
        except ValueError as exc:
            content, error = f"malformed sandbox request: {exc}", True
        replies.write(json.dumps({"content": content, "error": error}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
