"""natural_reasoning's admission filters: our reasoning heuristics, then datatrove's filter blocks.

Every check is a datatrove `BaseFilter`, so the same objects run here one document at a time
(`filter(doc)`, no executor: this runs in the partition driver as rows are read) and in datatrove's
own executor (the benchmark's peer). Order: cheapest first, first failure wins:

1. `heuristics` (ours, one regex pass): too short, not English prose (stopword share), few reasoning
   cues. datatrove has no reasoning rule, and its language filter needs a fastText model we do not
   ship, so these stay ours, with today's reasons.
2. datatrove's `fineweb_quality`, `gopher_quality`, `gopher_repetition`, then `c4_quality` last (it
   rewrites `doc.text`, dropping lines, which later blocks must not see). Reasons read
   `gopher_quality: gopher_below_alpha_threshold (0.62 of words alphabetic)`.

Words are split by `RegexWords`, not spaCy (datatrove's English default): no 200 MB dependency and
6-20x faster; bench/README.md gives its verdict agreement with spaCy.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matrix_provider.pipelines.heuristics import HEURISTIC_DEFAULTS

if TYPE_CHECKING:  # datatrove imports in ~0.7 s: only drivers that admit rows pay it, on first use
    from datatrove.pipeline.filters.base_filter import BaseFilter

DATATROVE_BLOCKS = ("fineweb_quality", "gopher_quality", "gopher_repetition", "c4_quality")
"""datatrove's blocks in the order they run (cheapest first, C4 last because it rewrites the text)."""


class ParamsError(ValueError):
    """A filter parameter in the spec's `params` that cannot work; the message names the key."""


@dataclass(frozen=True)
class Check:
    """One block of the chain: its spec name and the datatrove filter object that runs it."""

    name: str
    step: BaseFilter

    def verdict(self, doc: Any) -> str | None:
        """None to keep the document, else the row's `filtered` reason."""
        result = self.step.filter(doc)
        if result is True or (isinstance(result, tuple) and result[0]):
            return None
        why = result[1] if isinstance(result, tuple) else "dropped"
        if self.name == "heuristics":
            return why
        from matrix_provider.pipelines.filter_blocks import measured

        value = measured(why, doc.text)
        return f"{self.name}: {why}" + (f" ({value})" if value else "")


_built: tuple[dict[str, Any], list[Check], Any] | None = None


def document_verdict(text: Any, params: dict[str, Any]) -> str | None:
    """None to admit a document, else the first failing check's reason.

    Raises TypeError for a text that is not a string, ParamsError for bad `params`: the driver makes
    either that row's error, never the unit's.
    """
    global _built
    if not isinstance(text, str):
        raise TypeError(f"the row's text is not a string but {type(text).__name__}")
    if _built is None or _built[0] is not params:  # built once per run's params (the driver's dict)
        from datatrove.data import Document

        _built = (params, build_chain(params), Document)
    _, chain, document = _built
    doc = document(text=text, id="")
    for check in chain:
        reason = check.verdict(doc)
        if reason is not None:
            return reason
    return None


def build_chain(params: dict[str, Any]) -> list[Check]:
    """The checks `params` switch on, in order; raises ParamsError naming a bad key."""
    from matrix_provider.pipelines.filter_blocks import BLOCKS, ReasoningHeuristics, regex_words

    heuristics = {key: _number(params, key, default) for key, default in HEURISTIC_DEFAULTS.items()}
    chain = [Check("heuristics", ReasoningHeuristics(heuristics))]
    for name in DATATROVE_BLOCKS:
        kwargs = _block_kwargs(name, params.get(name, {}), BLOCKS[name])
        if kwargs is not None:
            chain.append(Check(name, BLOCKS[name](**kwargs, language=regex_words())))
    return chain


def check_params(params: dict[str, Any]) -> None:
    """The pipelines' `Pipeline.check_params`: builds the chain once, so a bad key fails the run at once."""
    build_chain(params)


def _number(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ParamsError(f"params.{key} must be a number >= 0, got {value!r}")
    return value


def _block_kwargs(name: str, block: Any, cls: type[BaseFilter]) -> dict[str, Any] | None:
    """The constructor arguments of a datatrove block from its `params.<name>` mapping (None: off)."""
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ParamsError(f"params.{name} must be a mapping (e.g. {{enabled: false}}), got {block!r}")
    enabled = block.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ParamsError(f"params.{name}.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    signature = inspect.signature(cls.__init__).parameters
    allowed = {k: p.default for k, p in signature.items() if k not in ("self", "exclusion_writer", "language")}
    kwargs = {k: v for k, v in block.items() if k != "enabled"}
    for key, value in kwargs.items():
        if key not in allowed:
            raise ParamsError(f"params.{name}: unknown key {key!r}; it takes enabled, {', '.join(sorted(allowed))}")
        _check_value(f"params.{name}.{key}", value, allowed[key])
    return kwargs


def _check_value(key: str, value: Any, default: Any) -> None:
    """A value of the same kind as datatrove's default (None switches a numeric rule off)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int | float) or default is None:
        ok = value is None or (not isinstance(value, bool) and isinstance(value, int | float))
    elif isinstance(default, tuple | list):
        ok = isinstance(value, list | tuple) and all(_is_pair(item) for item in value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ParamsError(f"{key}: expected a value like {default!r}, got {value!r}")


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, list | tuple)
        and len(item) == 2
        and isinstance(item[0], int)
        and isinstance(item[1], int | float)
        and not isinstance(item[1], bool)
    )
