"""The `sandbox` section of a pipeline spec."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SandboxSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["bwrap", "apptainer", "none"] = Field(
        "bwrap", description="bwrap (one host), apptainer (clusters), none (no isolation: debugging only)"
    )
    pools: int = Field(1, ge=1, description="pool actors, spread over the nodes (one per node on a cluster)")
    pool_size: int = Field(8, ge=1, description="live sandboxes per pool; acquisition waits for a free one")
    warm: int = Field(2, ge=0, description="spare workers per pool started ahead with the host module imported")
    call_timeout_s: float = Field(10.0, gt=0, description="a tool call running longer is stopped")
    cpu_seconds: int = Field(60, ge=1, description="RLIMIT_CPU of a sandbox process")
    memory_mb: int = Field(2048, ge=64, description="RLIMIT_AS of a sandbox process")
    lease_ttl_s: float = Field(600.0, gt=0, description="a lease unused this long is released (its agent died)")
    image: str | None = Field(None, description="apptainer image (.sif path or URI); required by that backend")

    @model_validator(mode="after")
    def _image_matches_backend(self) -> SandboxSpec:
        if self.backend == "apptainer" and not self.image:
            raise ValueError(
                "sandbox.backend=apptainer needs sandbox.image (a .sif path or URI of an image with python, "
                "matrix_provider and the tool host's package installed)"
            )
        if self.backend != "apptainer" and self.image:
            raise ValueError(f"sandbox.image is used only by backend apptainer, not {self.backend!r}")
        return self
