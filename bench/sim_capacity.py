"""Does the load simulator deliver the capacity it reports? Saturate it over HTTP and measure.

    python bench/sim_capacity.py [--slots 32] [--decode 0.01] [--tokens 50] [--seconds 20]

Starts a local Ray, one simulator replica, and keeps 4x `slots` requests of exactly `tokens`
output tokens in flight for `seconds`. Prints reported vs measured completion tokens/s and writes
bench/results/sim_capacity.json. The issue's bar: within 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import ray

from matrix_provider.llm.sim_server import deploy_sim, sim_stats
from matrix_provider.llm.spec import SimSpec

RESULTS = Path(__file__).resolve().parent / "results"


async def saturate(url: str, in_flight: int, tokens: int, seconds: float) -> tuple[int, float]:
    done_tokens = 0
    stop = time.monotonic() + seconds
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": tokens}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=in_flight), timeout=60) as client:

        async def worker(i: int) -> None:
            nonlocal done_tokens
            n = 0
            while time.monotonic() < stop:
                n += 1
                resp = await client.post(f"{url}/chat/completions", json={**body, "user": f"{i}-{n}"})
                done_tokens += resp.json()["usage"]["completion_tokens"]

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(in_flight)))
        return done_tokens, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--decode", type=float, default=0.01, help="seconds per output token")
    parser.add_argument("--tokens", type=int, default=50, help="output tokens per request")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    spec = SimSpec(
        backend="sim",
        slots=args.slots,
        decode_s_per_token=args.decode,
        prefill_s_per_token=0.0,
        output_tokens_mean=args.tokens,
        output_tokens_sigma=0.0,
        output_tokens_max=args.tokens,
    )
    (url,) = deploy_sim(spec, "bench-sim-capacity")
    asyncio.run(saturate(url, args.slots, args.tokens, 2.0))  # warm up connections
    tokens, elapsed = asyncio.run(saturate(url, 4 * args.slots, args.tokens, args.seconds))
    (stats,) = sim_stats("bench-sim-capacity", 1)
    reported = stats["capacity_tokens_per_s"]
    measured = tokens / elapsed
    result = {
        "reported_capacity_tokens_per_s": reported,
        "measured_tokens_per_s": round(measured, 1),
        "ratio": round(measured / reported, 4),
        "slots": args.slots,
        "decode_s_per_token": args.decode,
        "tokens_per_request": args.tokens,
        "seconds": round(elapsed, 2),
        "within_10_percent": abs(measured / reported - 1) <= 0.10,
    }
    print(f"{'figure':<32}{'value':>14}")
    for key, value in result.items():
        print(f"{key:<32}{value!s:>14}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sim_capacity.json").write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
