"""The benchmark workloads and the simulator they run on.

- `natural_reasoning`: every document passes the admission checks, so each row makes 1 to 3 LLM calls
  (filter, then score and question for the survivors, ~23 %), the shipped pipeline's own roles.
- `coral`: `bench/coral_shaped.py`, a proposer and a critic talking for 1 to 8 rounds (2 to 16
  calls) with a growing history.

Output lengths are lognormal (heavy-tailed). All runners run the same roles and routing on the
same rows and simulator replicas, so they do the same work.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from matrix_provider.llm.spec import SimSpec

BENCH = Path(__file__).resolve().parent
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


@dataclass(frozen=True)
class Workload:
    name: str
    spec: str  # a shipped pipeline name or a YAML path
    stages: tuple[str, ...]  # the roles in order, unrolled, for the batch baseline
    traffic: tuple[float, ...]  # the share of rows each stage works on (the simulator's rates)
    extra: tuple[str, ...] = ()  # overrides on top of the simulator's


NATURAL_REASONING = Workload(
    "natural_reasoning",
    "natural_reasoning",
    ("filter", "score", "question"),
    (1.0, 0.5, 0.25),  # the classifier keeps half; a 0-5 score is >= 3 for half of those
    ("roles.question.max_tokens=512", "roles.filter.max_tokens=512", "roles.score.max_tokens=512"),
)
CONTROLLER_BOUND = Workload(
    "controller_bound",
    str(BENCH / "controller_bound.yaml"),
    ("a", "b", "a", "b"),
    (1.0, 1.0, 1.0, 1.0),
)
IN_PROCESS_MODEL = Workload(
    "in_process_model",
    str(BENCH / "in_process_model.yaml"),
    ("draft", "embed", "judge"),
    (1.0, 1.0, 1.0),
)
CORAL = Workload(
    "coral",
    str(BENCH / "coral_shaped.yaml"),
    ("proposer", "critic") * 8,
    tuple(0.7**r for r in range(8) for _ in range(2)),  # the critic agrees with p = 0.3 per round
)


def write_corpus(
    directory: Path, rows: int, files: int = 1, seed: int = 0, kb: tuple[float, float] | None = None
) -> Path:
    """`rows` documents over `files` JSONL shards: 160-400 words each, or log-uniform between `kb`
    kilobytes (the controller-bound histories). One file by default, split by the runtime into a
    unit per partition: a DCLM shard holds far more rows than a driver keeps in flight, and a
    driver holds at most three units, so small files would cap p2p's rows in flight (the `units`
    section measures that)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    outs = [(directory / f"shard-{i:03d}.jsonl").open("w") for i in range(files)]
    for i in range(rows):
        if kb is None:
            words = rng.randint(160, 400)
        else:
            words = int(1000 * math.exp(rng.uniform(math.log(kb[0]), math.log(kb[1]))) / 5)  # 5 chars a word
        text = f"Document {i}. " + _prose(rng, words)
        outs[i % files].write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    for out in outs:
        out.close()
    return directory


def _prose(rng: random.Random, words: int) -> str:
    """`words` random words as sentences in paragraphs of four, so that the documents pass
    natural_reasoning's admission (datatrove's blocks want terminal punctuation and lines)."""
    sentences = []
    while words > 0:
        n = min(words, rng.randint(8, 16))
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    return "\n".join(" ".join(sentences[k : k + 4]) for k in range(0, len(sentences), 4))


def sim_spec(
    slots: int,
    decode_s: float,
    replicas: int = 1,
    output_mean: int = 48,
    seed: int = 0,
    model: str = "sim",
    prefill_s: float = 0.0,
) -> SimSpec:
    """The simulator; `model="vllm-like"` replaces the fixed `decode_s` per token with the GPU-like
    step model (matrix_provider/llm/sim.py)."""
    return SimSpec(
        backend="sim",
        model=model,
        slots=slots,
        replicas=replicas,
        decode_s_per_token=decode_s,
        prefill_s_per_token=prefill_s,
        output_tokens_mean=output_mean,
        output_tokens_sigma=1.0,
        output_tokens_max=1024,
        n_ctx=1 << 20,
        seed=seed,
        timeout_s=600,
        retries=2,
    )


def overrides(spec: SimSpec, workload: Workload) -> list[str]:
    """The simulator `spec` and the workload's settings as `matrix run` overrides."""
    keys = (
        "model",
        "slots",
        "replicas",
        "decode_s_per_token",
        "prefill_s_per_token",
        "output_tokens_mean",
        "output_tokens_sigma",
        "output_tokens_max",
        "n_ctx",
        "seed",
        "timeout_s",
        "retries",
    )
    return ["llm=sim", *(f"llm.{k}={getattr(spec, k)}" for k in keys), *workload.extra]
