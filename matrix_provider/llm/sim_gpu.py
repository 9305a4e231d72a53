"""A physical model of one GPU serving one model with a vLLM-like scheduler, stepped without a clock.

The load simulator (`sim.py`, `model: vllm-like`) sleeps through its steps; the benchmark's
discrete-event model (`bench/model.py`) advances them in simulated time. Both step this one class,
so they share every rule:

- a step reads the weights and every scheduled sequence's KV cache once (memory time) and computes
  every token it schedules (compute time); it takes the longer of the two, plus a fixed overhead
  and a little per sequence (sampling, bookkeeping). Decode steps are memory-bound, prefill is
  compute-bound: an 8B model's prompt token costs at least 2 x 8e9 FLOP / 312 TFLOP/s = 51 us;
- chunked prefill: a step schedules at most `max_batched_tokens` tokens, running sequences' decode
  tokens first, then prompt chunks; at most `max_seqs` sequences run at once;
- KV paging: a sequence holds blocks of `block_tokens` for the tokens it has computed and takes one
  more as it grows; when none is free the most recently admitted sequence is preempted (its blocks
  freed, recomputed later from its prompt and what it had generated, as vLLM's recompute mode);
- a prefix cache per replica: full prompt blocks, keyed by a hash chain of their text, are kept
  (LRU, as many as the KV cache has blocks) when a prefill completes; a later prompt that starts
  with them computes only the rest. So routing a dialogue's turns to the same replica pays off.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

BLOCK_CHARS = 64  # a prefix-cache block of 16 tokens, at the simulator's 4 characters a token


@dataclass(frozen=True)
class GpuModel:
    """The hardware and model constants of one replica."""

    weight_bytes: float
    kv_bytes_per_token: float
    hbm_bytes_per_s: float
    flops_per_token: float  # 2 x parameters
    flops_per_s: float  # achievable, not peak
    step_overhead_s: float
    seq_overhead_s: float
    kv_tokens: int
    max_seqs: int = 256
    max_batched_tokens: int = 2048
    block_tokens: int = 16

    def step_s(self, seqs: int, tokens: int, context: int) -> float:
        """One step scheduling `seqs` sequences and `tokens` tokens over `context` tokens of KV."""
        memory = (self.weight_bytes + self.kv_bytes_per_token * context) / self.hbm_bytes_per_s
        compute = tokens * self.flops_per_token / self.flops_per_s
        return self.step_overhead_s + self.seq_overhead_s * seqs + max(memory, compute)

    def capacity_tokens_per_s(self, mean_context: float, slots: int | None = None) -> float:
        """Completion tokens/s decoding a full batch (as many sequences as slots and KV allow)."""
        seqs = max(1, min(slots or self.max_seqs, self.max_seqs, int(self.kv_tokens // max(mean_context, 1.0))))
        return seqs / self.step_s(seqs, seqs, round(seqs * mean_context))


# Llama-3.1-8B in bf16 on one A100-80GB: 16 GB of weights and 128 KB of KV a token (32 layers x 8 KV
# heads x 128 x 2 x 2 bytes) at 2.0 TB/s; 312 TFLOP/s peak, ~70 % of it in large GEMMs; ~60 GB for KV.
GPU_MODELS = {
    "vllm-like": GpuModel(
        weight_bytes=16.06e9,
        kv_bytes_per_token=131_072,
        hbm_bytes_per_s=2.0e12,
        flops_per_token=16.06e9,
        flops_per_s=0.7 * 312e12,
        step_overhead_s=0.0015,
        seq_overhead_s=0.00002,
        kv_tokens=460_000,
    )
}


def prompt_blocks(text: str) -> tuple[int, ...]:
    """Prefix-cache keys of a prompt's full blocks: each hashes its text and every block before it."""
    keys, key = [], 0
    for start in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
        key = hash((key, text[start : start + BLOCK_CHARS]))
        keys.append(key)
    return tuple(keys)


@dataclass(eq=False)
class Seq:
    """One request: `prompt` tokens in, `output` tokens to generate; `ticket` is the caller's."""

    prompt: int
    output: int
    blocks: Sequence[int] = ()
    ticket: Any = None
    computed: int = 0  # tokens whose KV exists
    generated: int = 0
    held: int = 0  # KV blocks
    prefilled: bool = False  # its prompt blocks went into the prefix cache


@dataclass
class Scheduler:
    """Waiting and running sequences of one replica; `step` plans and applies one engine step."""

    gpu: GpuModel
    max_seqs: int | None = None  # fewer slots than the model's, for a small benchmark
    waiting: deque[Seq] = field(default_factory=deque)
    running: list[Seq] = field(default_factory=list)
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    preemptions: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache spared

    def __post_init__(self) -> None:
        self.blocks = self.gpu.kv_tokens // self.gpu.block_tokens
        self.free = self.blocks
        self.slots = min(self.max_seqs or self.gpu.max_seqs, self.gpu.max_seqs)

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.gpu.block_tokens)

    def _preempt(self) -> None:
        victim = self.running.pop()
        self.free += victim.held
        victim.held = victim.computed = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1

    def _lookup(self, seq: Seq) -> None:
        """A fresh sequence starts from the longest cached prefix of its prompt (one token always computed)."""
        self.prompt_tokens += seq.prompt
        hits = 0
        for key in seq.blocks:
            if key not in self.cache:
                break
            self.cache.move_to_end(key)
            hits += 1
        seq.computed = min(hits * self.gpu.block_tokens, seq.prompt - 1)
        self.cached_tokens += seq.computed

    def step(self) -> tuple[float, list[Seq]]:
        """(seconds, sequences finished) of the next step; (0.0, []) when there is nothing to run."""
        budget = self.gpu.max_batched_tokens
        planned: list[tuple[Seq, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted to make room for an earlier one
                continue
            n = min(seq.prompt + seq.generated - seq.computed, budget)
            if n <= 0:
                continue
            want = self._blocks_for(seq.computed + n) - seq.held
            while want > self.free and self.running[-1] is not seq:
                self._preempt()
            if want > self.free and len(self.running) > 1:
                continue  # the sequences before it finish first; alone, a sequence always runs
            self.free -= want
            seq.held += want
            planned.append((seq, n))
            budget -= n
        while self.waiting and len(self.running) < self.slots and budget > 0:
            seq = self.waiting[0]
            if seq.computed == 0 and seq.generated == 0:
                self._lookup(seq)
            n = min(seq.prompt + seq.generated - seq.computed, budget)
            want = self._blocks_for(seq.computed + n)
            if want > self.free and self.running:
                break
            self.waiting.popleft()
            self.free -= want
            seq.held = want
            self.running.append(seq)
            planned.append((seq, n))
            budget -= n
        if not planned:
            return 0.0, []
        tokens = sum(n for _, n in planned)
        context = sum(seq.computed + n for seq, n in planned)
        seconds = self.gpu.step_s(len(planned), tokens, context)
        finished = []
        for seq, n in planned:
            seq.computed += n
            if seq.computed < seq.prompt + seq.generated:
                continue  # a prompt chunk: no token sampled yet
            if not seq.prefilled:
                seq.prefilled = True
                self._remember(seq.blocks)
            seq.generated += 1
            if seq.generated >= seq.output:
                finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
            self.free += seq.held
            seq.held = 0
        return seconds, finished

    def _remember(self, keys: Sequence[int]) -> None:
        for key in keys:
            self.cache[key] = None
            self.cache.move_to_end(key)
        while len(self.cache) > self.blocks:
            self.cache.popitem(last=False)
