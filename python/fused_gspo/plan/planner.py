"""The planner: which strategy and which chunks, within a workspace budget, by the cost model's prediction.

Candidates are the single pass (when the objective's gradient coupling allows it and every row fits, chunks cut only
between rows for sequence coupling) and the two phases (score, then recompute for the gradient; chunks anywhere).
Chunks cut anywhere are the fewest the budget allows (the same for every pass over the same tokens); chunks of whole
rows the fewest and a few more. Chunks are balanced: ``k`` chunks of ``N / k`` tokens rather than full chunks and a
small tail, so the workspace actually allocated is no larger than it has to be. The no-grad pass's ``"auto"`` budget
is the one a training call over the same tokens gets.

On a GPU the candidate with the smallest predicted time wins; a larger budget only adds candidates, so it is never
predicted slower. The single pass wins at every realistic shape (it saves a whole projection, ``2NHV``); the two
phases win only where a chunk's projection takes less time than the objective's few dozen tiny kernels per chunk,
i.e. where everything takes microseconds. On CPU (and under the Triton interpreter) the model's figures are nominal,
so the rule is fixed: the single pass whenever it is allowed, with the fewest chunks.

The ``"auto"`` budget (:func:`auto_workspace_bytes`) is documented in ``docs/design.md`` ("The default budget").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from .cost import ChunkFormat, Costing, Problem, floor_cost, peak_bytes, schedule_cost
from .devices import DeviceProfile

MIB = 1 << 20
# On CPU (and under the Triton interpreter) the budget that has always been used: chunks of a few hundred tokens at
# LLM vocabularies, small enough that the development machines never notice the workspace
AUTO_CPU_BYTES = 512 * MIB
# On a GPU: at most this share of the memory free when the call starts (the rest of the step still needs its
# activations' gradients, the optimizer and the allocator's slack) ...
AUTO_FREE_FRACTION = 0.25
# ... and no more than it takes to come within this fraction of the fastest schedule the model knows (no budget)
AUTO_SLACK = 0.005
# ... but at least this much, if the device has it: below it the per-chunk fixed costs start to show
AUTO_MIN_BYTES = 256 * MIB
# ... and at most this much, whatever the batch: one chunk of the reference batch (N=8192, V=151936, bf16 logits:
# 2.3 GiB) fits, a longer batch takes a few chunks, so the peak stays near flat as N grows instead of growing with it
# (at N=32768 one chunk would hold 9.3 GiB of logits to save about 1.5% of the step)
AUTO_MAX_BYTES = 4 << 30
# When a named profile is planned for without a device at hand, the share of its memory assumed free
ASSUMED_FREE_FRACTION = 0.5
# How many chunk counts past the fewest the budget allows are costed
EXTRA_CANDIDATES = 3


@dataclass
class ChunkPlan:
    """What the driver runs: ``strategy`` (``"single_pass"`` or ``"two_phase"``),
    token ``bounds`` ``[(start, stop), ...]`` in the order of the valid tokens, and the prediction behind the choice."""

    strategy: str
    bounds: list[tuple[int, int]]
    workspace_bytes: int
    costing: Costing
    floor: Costing
    peak_bytes: int
    alternatives: dict[str, float] = field(default_factory=dict)  # predicted ms of the best of each strategy
    fmt: ChunkFormat | None = None  # how the driver holds each chunk (the format the plan was costed for)

    @property
    def chunk_tokens(self) -> int:
        return max((stop - start for start, stop in self.bounds), default=0)

    @property
    def num_chunks(self) -> int:
        return len(self.bounds)


def token_bounds(n_tokens: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` ranges covering ``[0, n_tokens)``, sizes differing by at most one."""
    if n_tokens == 0:
        return []
    chunks = max(1, min(chunks, n_tokens))
    base, extra = divmod(n_tokens, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def row_bounds(row_counts: Sequence[int], capacity: int) -> list[tuple[int, int]]:
    """Greedy ranges of whole rows (rows of ``row_counts`` valid tokens, in order) of at most ``capacity`` tokens:
    the fewest chunks that cut only between rows. Empty rows never start a chunk."""
    bounds, start, end = [], 0, 0
    for count in row_counts:
        if count > capacity:
            raise ValueError(f"a row of {count} tokens does not fit chunks of {capacity}")
        if end + count - start > capacity:
            bounds.append((start, end))
            start = end
        end += count
    if end > start:
        bounds.append((start, end))
    return bounds


def balanced_row_bounds(row_counts: Sequence[int], chunks: int, capacity: int) -> list[tuple[int, int]]:
    """Whole-row ranges, at most ``chunks`` of them if ``capacity`` allows, with the widest as narrow as possible
    (binary search over the capacity handed to :func:`row_bounds`)."""
    lo, hi = max(max(row_counts, default=0), 1), capacity
    if len(row_bounds(row_counts, hi)) > chunks:
        return row_bounds(row_counts, hi)
    while lo < hi:  # greedy packing never needs more chunks for a larger capacity
        mid = (lo + hi) // 2
        if len(row_bounds(row_counts, mid)) <= chunks:
            hi = mid
        else:
            lo = mid + 1
    return row_bounds(row_counts, lo)


def capacity_tokens(problem: Problem, fmt: ChunkFormat, workspace_bytes: int) -> int:
    """Tokens per chunk the budget holds."""
    return workspace_bytes // fmt.bytes_per_token(problem.vocab, problem.hidden)


def _sizes(bounds):
    return [stop - start for start, stop in bounds]


def candidates(
    problem: Problem, fmt: ChunkFormat, coupling: str, row_counts: Sequence[int] | None, capacity: int, mode: str
):
    """Every ``(strategy, bounds)`` the planner costs."""
    n = problem.tokens
    if n == 0:
        # Nothing to score, but a globally coupled objective (the entropy quantile) still takes part in the
        # cross-process gather of every entropy, which only the two phases make: another process with tokens waits
        # for it
        return [("single_pass" if mode != "logprobs" and coupling != "global" else "two_phase", [])]
    if capacity < 1:
        return []
    # Chunks cut anywhere are always the fewest the budget allows, balanced: one chunking per token count and budget,
    # whatever the pass, so the no-grad pass and a token-coupled training pass over the same tokens project the same
    # rows in the same GEMMs (their log-probs are then the same bits; a GEMM may round a row differently when it
    # shares the call with other rows)
    fewest = -(-n // capacity)
    out = [("two_phase", token_bounds(n, fewest))]
    if mode == "logprobs" or coupling == "global":
        return out
    if coupling == "token":
        single = [token_bounds(n, fewest)]
    else:
        counts = list(row_counts)
        if max(counts, default=0) > capacity:
            return out  # a row longer than the workspace: only two phases can score it
        rows = sum(1 for c in counts if c)
        greedy = len(row_bounds(counts, capacity))
        single = [
            balanced_row_bounds(counts, k, capacity) for k in range(greedy, min(greedy + EXTRA_CANDIDATES, rows) + 1)
        ]
    return [("single_pass", b) for b in single] + out


def choose(
    problem: Problem,
    fmt: ChunkFormat,
    *,
    coupling: str,
    row_counts: Sequence[int] | None,
    workspace_bytes: int,
    profile: DeviceProfile,
    mode: str,
    weight_copy: bool = False,
) -> ChunkPlan:
    """The plan with the smallest predicted time among :func:`candidates` within ``workspace_bytes``.

    ``coupling``: ``"token"``, ``"sequence"`` or ``"global"`` (:func:`fused_gspo.objectives.gradient_coupling`).
    ``row_counts``: valid tokens per row, in order (needed for sequence coupling). ``mode``: ``"fwd_bwd"``, ``"fwd"``
    (the forward of a training step: chosen as for ``"fwd_bwd"``, costed as its forward) or ``"logprobs"`` (no
    gradient). ``alternatives`` hold each strategy's best time in the mode that decided. Raises ``ValueError`` when
    the budget cannot hold one token's logits row.
    """
    if coupling not in ("token", "sequence", "global"):
        raise ValueError(f"coupling must be 'token', 'sequence' or 'global', got {coupling!r}")
    if coupling == "sequence" and row_counts is None:
        raise ValueError("row_counts are needed to plan chunks that cut only between rows")
    capacity = capacity_tokens(problem, fmt, workspace_bytes)
    if problem.tokens > 0 and capacity < 1:
        row = fmt.bytes_per_token(problem.vocab, problem.hidden)
        # vocabulary-parallel: the row is one rank's largest shard's, not the vocabulary's
        at = f"V={problem.vocab}" if problem.tensor_parallel == 1 else f"{problem.vocab} rows, the largest shard"
        raise ValueError(f"workspace_bytes={workspace_bytes} cannot hold one token's logits row ({row} bytes at {at})")
    # a training step's forward is planned for the whole step (the single pass does the backward's work early)
    decide_by = "fwd_bwd" if mode == "fwd" else mode
    scored = []
    alternatives: dict[str, float] = {}
    for strategy, bounds in candidates(problem, fmt, coupling, row_counts, capacity, mode):
        costing = schedule_cost(problem, fmt, _sizes(bounds), strategy, decide_by, profile)
        alternatives[strategy] = min(alternatives.get(strategy, float("inf")), costing.ms)
        scored.append((costing.ms, strategy, bounds, costing))
    if profile.is_gpu:
        _, strategy, bounds, costing = min(scored, key=lambda s: s[0])
    else:  # candidates come single pass first, fewest chunks first
        _, strategy, bounds, costing = scored[0]
    if decide_by != mode:
        costing = schedule_cost(problem, fmt, _sizes(bounds), strategy, mode, profile)
    widest = max(_sizes(bounds), default=0)
    return ChunkPlan(
        strategy=strategy,
        bounds=bounds,
        workspace_bytes=workspace_bytes,
        costing=costing,
        floor=floor_cost(problem, mode, profile),
        peak_bytes=peak_bytes(problem, fmt, widest, strategy, mode, weight_copy),
        alternatives=alternatives,
        fmt=fmt,
    )


def auto_workspace_bytes(
    problem: Problem,
    fmt: ChunkFormat,
    *,
    coupling: str,
    row_counts: Sequence[int] | None,
    profile: DeviceProfile,
    mode: str,
    free_bytes: float | None = None,
) -> int:
    """The default budget (``workspace_bytes="auto"``).

    On CPU: :data:`AUTO_CPU_BYTES`. On a GPU: the smallest budget whose predicted time is within :data:`AUTO_SLACK`
    of the fastest plan with no budget at all, but at least :data:`AUTO_MIN_BYTES` and at most
    :data:`AUTO_FREE_FRACTION` of ``free_bytes`` (default: :data:`ASSUMED_FREE_FRACTION` of the profile's memory)
    and :data:`AUTO_MAX_BYTES`.
    """
    if not profile.is_gpu:
        return AUTO_CPU_BYTES
    if mode == "logprobs":
        # the no-grad pass takes the budget of a training call over the same tokens (the token-coupled one: it knows
        # no rows), so that both cut the same chunks and their log-probs are the same bits
        problem = dataclasses.replace(problem, hidden_grad=True, weight_grad=True)
        coupling, row_counts = "token", None
    mode = "fwd_bwd" if mode in ("fwd", "logprobs") else mode  # as choose() decides
    if free_bytes is None:
        free_bytes = ASSUMED_FREE_FRACTION * profile.memory_bytes
    row = fmt.bytes_per_token(problem.vocab, problem.hidden)
    cap = max(min(int(AUTO_FREE_FRACTION * free_bytes), AUTO_MAX_BYTES), row)
    if problem.tokens == 0:
        return max(min(AUTO_MIN_BYTES, cap), row)

    def plan_for(tokens_per_chunk: int) -> ChunkPlan:
        return choose(
            problem,
            fmt,
            coupling=coupling,
            row_counts=row_counts,
            workspace_bytes=tokens_per_chunk * row,
            profile=profile,
            mode=mode,
        )

    whole = problem.tokens
    if coupling == "sequence" and row_counts:
        whole = max(whole, max(row_counts))
    target = plan_for(whole).costing.ms * (1 + AUTO_SLACK)
    # The predicted time falls as chunks grow: binary search for the smallest chunk within the slack
    lo, hi = 1, whole
    while lo < hi:
        mid = (lo + hi) // 2
        if plan_for(mid).costing.ms <= target:
            hi = mid
        else:
            lo = mid + 1
    budget = max(lo * row, min(AUTO_MIN_BYTES, cap))
    return int(min(budget, cap))
