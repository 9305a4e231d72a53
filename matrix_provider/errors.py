"""Errors that every layer may raise about the spec (the runtime, the sandbox, the LLM backends):
apart from runtime/spec.py so a lower layer names them without importing the runtime."""


class SpecError(ValueError):
    """A spec, override or run argument is wrong; the message names the key and the fix."""
