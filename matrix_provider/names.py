"""Actor names and the namespace: every actor carries its run and role so `ray list actors` shows who
is who. A bottom module: the runtime, the sandbox and the LLM servers all name actors."""

NAMESPACE = "matrix"


def agent_name(run_id: str, chain: str, index: int) -> str:
    """`chain` is a role, or chained roles joined by `+` (`runtime/chains.py`)."""
    return f"matrix-{run_id}-agent-{chain}-{index}"


def driver_name(run_id: str, partition: int) -> str:
    return f"matrix-{run_id}-driver-{partition}"


def sandbox_name(run_id: str, index: int) -> str:
    return f"matrix-{run_id}-sandbox-{index}"
