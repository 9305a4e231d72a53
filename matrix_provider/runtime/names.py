"""Actor names: every actor carries its run and role so `ray list actors` shows who is who."""

NAMESPACE = "matrix"


def agent_name(run_id: str, role: str, index: int) -> str:
    return f"matrix-{run_id}-agent-{role}-{index}"


def driver_name(run_id: str, partition: int) -> str:
    return f"matrix-{run_id}-driver-{partition}"


def sandbox_name(run_id: str, index: int) -> str:
    return f"matrix-{run_id}-sandbox-{index}"
