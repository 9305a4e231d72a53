"""vLLM's CPU build behind Ray Serve LLM, measured: sticky vs round-robin routing, and its step time.

    python bench/vllm_cpu.py [--sections routing,steps] [--rows 16] [--concurrency 16] [--turns 4]

routing  two vLLM replicas (one Serve LLM app), coral dialogues at the same rows in flight, once with
         sticky routing (Serve's ConsistentHashRouter on our client's sticky key) and once with
         Serve's RoundRobinRouter: vLLM's own prefix-cache hit rate (its `prefix_cache_hits` over
         `prefix_cache_queries` counters, as Ray exports them) and completion tokens/s.
steps    one replica: decode step time against batch size and context length (the time of N
         output tokens minus the time of one, over N-1, with `ignore_eos`), next to the load
         simulator's step model (`matrix_provider.llm.sim.StepModel`) fitted to those points by
         least squares: the shape is what the simulator must get right, not a 2-core CPU's speed.

Needs `make vllm-weights` (the vLLM venv and SmolLM2's weights). Starts a local Ray; writes
bench/results/vllm_cpu.json. Absolute speeds on a shared 2-core machine are noise; compare within
one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matrix_provider.llm import backends  # noqa: E402
from matrix_provider.monitoring.scrape import scrape, total  # noqa: E402
from matrix_provider.runtime import job  # noqa: E402
from matrix_provider.runtime.spec import compose  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
QUESTIONS = ROOT / "matrix_provider" / "data" / "coral" / "questions.jsonl"
MODEL = "smollm2-135m-instruct"
# Two replicas on two cores: one OpenMP thread each, unbound, so the OS gives each replica a core
# (vLLM's automatic binding would put both on core 0).
TWO_REPLICAS = [
    "llm.min_replicas=2",
    "llm.max_replicas=2",
    "++llm.engine_env.VLLM_CPU_OMP_THREADS_BIND=nobind",
    "++llm.engine_env.OMP_NUM_THREADS='1'",
]


def _llm(app: str, *extra: str) -> list[str]:
    return ["llm=vllm_cpu", f"llm.app_name={app}", f"llm.python={VLLM_PY}", *extra]


def _metrics_url() -> str:
    port = next(node["MetricsExportPort"] for node in ray.nodes() if node["Alive"])
    return f"http://127.0.0.1:{port}/metrics"


def _counters(url: str) -> dict[str, float]:
    samples = scrape(url, "vllm")
    names = ("prefix_cache_hits", "prefix_cache_queries", "generation_tokens", "prompt_tokens")
    return {name: total(samples, f"ray_vllm_{name}_total") for name in names}


def _settled(url: str, wait_s: float = 30.0) -> dict[str, float]:
    """The counters once two reads 6 s apart agree (Ray exports the engine's metrics every few seconds)."""
    last = _counters(url)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(6)
        now = _counters(url)
        if now == last:
            return now
        last = now
    return last


def routing(rows: int, concurrency: int, turns: int) -> dict[str, Any]:
    """Coral on two replicas with each router; returns hit rate and tokens/s per router."""
    out: dict[str, Any] = {"rows": rows, "concurrency": concurrency, "max_turns": turns, "replicas": 2}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "q.jsonl"
        src.write_text("\n".join(QUESTIONS.read_text().splitlines()[:rows]) + "\n")
        for routing_name in ("sticky", "round_robin"):
            app = f"bench-vllm-{routing_name.replace('_', '-')}"
            overrides = [
                *_llm(app, *TWO_REPLICAS, f"llm.routing={routing_name}"),
                f"params.max_turns={turns}",
                "roles.agent_a.max_tokens=64",
                "roles.agent_b.max_tokens=64",
                "roles.extract.max_tokens=32",
            ]
            run = {"input": str(src), "output": f"{tmp}/{routing_name}", "concurrency": concurrency}
            spec = compose("coral", overrides, run)
            started = time.monotonic()
            backends.probe(backends.deploy(job.run_backend(spec)))
            load_s = time.monotonic() - started
            url = _metrics_url()
            before = _settled(url)
            manifest = job.run(spec, quiet=True)
            after = _settled(url)
            delta = {k: after[k] - before[k] for k in after}
            out[routing_name] = {
                "engine_load_s": round(load_s, 1),
                "wall_s": manifest["wall_seconds"],
                "completion_tokens": manifest["completion_tokens"],
                "completion_tokens_per_s": round(manifest["completion_tokens"] / manifest["wall_seconds"], 2),
                "prefix_cache_queries": delta["prefix_cache_queries"],
                "prefix_cache_hits": delta["prefix_cache_hits"],
                "prefix_cache_hit_rate": round(delta["prefix_cache_hits"] / max(delta["prefix_cache_queries"], 1), 4),
                "engine_generation_tokens": delta["generation_tokens"],
                "rows_ok": manifest["rows_ok"],
                "mean_turns": manifest["summary"]["mean_turns"],
            }
            print(routing_name, json.dumps(out[routing_name]), flush=True)
            from ray import serve

            serve.delete(spec.llm.app_name)
    return out


async def _timed(client: httpx.AsyncClient, url: str, batch: int, prompt: str, tokens: int) -> float:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    started = time.monotonic()
    # Different prompts per sequence (a number in front), so the prefix cache does not shorten prefill.
    answers = await asyncio.gather(
        *(client.post(f"{url}/completions", json={**body, "prompt": f"{i} {prompt}"}) for i in range(batch))
    )
    for answer in answers:
        answer.raise_for_status()
    return time.monotonic() - started


def _prompt_of(tokens: int) -> str:
    """About `tokens` SmolLM2 tokens of plain English (one short word and a space is about one token)."""
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "off", "to", "see", "the", "dog"]
    return " ".join(words[i % len(words)] for i in range(tokens))


def steps(batches: list[int], contexts: list[int], tokens: int, reps: int) -> dict[str, Any]:
    """Decode step time on one replica against batch and context; the simulator's StepModel fitted to it."""
    spec = compose(
        "coral", _llm("bench-vllm-steps", "llm.engine_kwargs.max_num_seqs=32"), {"input": "-", "output": "-"}
    )
    config = backends.deploy(spec.llm)
    backends.probe(config)
    url = config.endpoints[0]
    points = []

    async def measure() -> None:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
            await _timed(client, url, 1, _prompt_of(16), 4)  # warm-up
            for context in contexts:
                prompt = _prompt_of(context)
                for batch in batches:
                    full = [await _timed(client, url, batch, prompt, tokens) for _ in range(reps)]
                    first = [await _timed(client, url, batch, prompt, 1) for _ in range(reps)]
                    step = (statistics.median(full) - statistics.median(first)) / (tokens - 1)
                    points.append({"batch": batch, "context": context, "step_s": step, "prefill_s": min(first)})
                    print(json.dumps(points[-1]), flush=True)

    asyncio.run(measure())
    from ray import serve

    serve.delete(spec.llm.app_name)
    # StepModel: step = a + b*batch + c*(batch*context); least squares over the measured points.
    design = np.array([[1.0, p["batch"], p["batch"] * (p["context"] + tokens / 2)] for p in points])
    measured = np.array([p["step_s"] for p in points])
    (a, b, c), *_ = np.linalg.lstsq(design, measured, rcond=None)
    for point, row in zip(points, design, strict=True):
        point["sim_step_s"] = float(row @ np.array([a, b, c]))
        point["sim_over_vllm"] = round(point["sim_step_s"] / point["step_s"], 3)
    return {"fit": {"a": a, "b": b, "c": c}, "tokens": tokens, "reps": reps, "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="routing,steps")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--contexts", default="64,512,1536")
    parser.add_argument("--tokens", type=int, default=17, help="output tokens per request in the step section")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "vllm_cpu.json")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    ray.init(address="local", namespace="matrix", include_dashboard=False, log_to_driver=False)
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)}
    if "routing" in sections:
        result["routing"] = routing(args.rows, args.concurrency, args.turns)
    if "steps" in sections:
        ints = [int(x) for x in args.batches.split(",")], [int(x) for x in args.contexts.split(",")]
        result["steps"] = steps(*ints, args.tokens, args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
