"""What a tool host is: the object inside a sandbox worker that runs one trajectory's tool calls.

A host is built in the worker by a factory named `"package.module:callable"`, called as
`factory(**init)` with the JSON-able `init` the caller sends; it keeps the trajectory's state
(e.g. a tau2 environment and its database) between calls.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol


class ToolError(Exception):
    """A tool's own failure (unknown tool, bad arguments): its text goes back to the model as the
    tool result, with error=True, and the trajectory continues."""


class ToolHost(Protocol):
    def call(self, name: str, arguments: dict[str, Any], requestor: str) -> str:
        """Run tool `name` for `requestor` (e.g. "assistant" or "user") and return its result text."""
        ...


def split_factory(factory: str) -> tuple[str, str]:
    """`"package.module:callable"` -> (module, attribute); a malformed name is a ValueError."""
    module, sep, attr = factory.partition(":")
    if not sep or not module or not attr.isidentifier():
        raise ValueError(f"tool host factory {factory!r} is not 'package.module:callable'")
    return module, attr


def load_factory(factory: str) -> Callable[..., ToolHost]:
    module, attr = split_factory(factory)
    return getattr(importlib.import_module(module), attr)
