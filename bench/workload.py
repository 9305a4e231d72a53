"""The benchmark workload: N documents through a natural_reasoning-shaped pipeline on the simulator.

Every document passes the cheap checks, so each row makes 1 to 3 LLM calls (filter, then score and
question for the survivors) with heavy-tailed (lognormal) output lengths. All three runners run
the same roles and routing code on the same rows and simulator replicas, so they do the same work.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from matrix_provider.llm.spec import SimSpec

_WORDS = [
    "because",
    "the",
    "plan",
    "is",
    "sorted",
    "therefore",
    "the",
    "cost",
    "is",
    "low",
    "and",
    "if",
    "the",
    "table",
    "grows",
    "then",
    "we",
    "must",
    "reason",
    "why",
    "since",
    "each",
    "step",
    "implies",
    "a",
    "result",
    "hence",
    "the",
    "example",
    "shows",
    "how",
    "a",
    "reason",
    "leads",
    "to",
    "it",
    "thus",
]


def write_corpus(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for i in range(rows):
            text = f"Document {i}. " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(160, 400)))
            out.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return path


def sim_spec(slots: int, decode_s: float, replicas: int = 1, seed: int = 0) -> SimSpec:
    return SimSpec(
        backend="sim",
        slots=slots,
        replicas=replicas,
        decode_s_per_token=decode_s,
        prefill_s_per_token=0.0,
        output_tokens_mean=48,
        output_tokens_sigma=1.0,
        output_tokens_max=1024,
        seed=seed,
        timeout_s=600,
        retries=2,
    )


def overrides(spec: SimSpec) -> list[str]:
    """The same simulator as `spec`, as `matrix run` overrides (so runner 1 reuses its replicas)."""
    keys = (
        "slots",
        "replicas",
        "decode_s_per_token",
        "prefill_s_per_token",
        "output_tokens_mean",
        "output_tokens_sigma",
        "output_tokens_max",
        "seed",
        "timeout_s",
        "retries",
    )
    return [
        "llm=sim",
        *(f"llm.{k}={getattr(spec, k)}" for k in keys),
        "roles.question.max_tokens=512",
        "roles.filter.max_tokens=512",
        "roles.score.max_tokens=512",
    ]
