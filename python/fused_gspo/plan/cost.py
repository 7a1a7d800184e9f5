"""The cost model of the chunked LM head: FLOPs, bytes and time of every stage of every chunk, and the peak memory.

Everything here is arithmetic on shapes; nothing touches a tensor. ``docs/design.md`` ("The chunk schedule and its
costs") derives the counts; in short, for a chunk of ``n`` tokens against a vocabulary of ``V`` with hidden size
``H``:

- *projection*: ``y = X_c @ W.T`` into the workspace tile: ``2nHV`` FLOPs, reads ``X_c`` and ``W``, writes ``2nV``
  bytes (logits staged in 16 bits) or ``4nV`` (fp32 staging), plus a read-modify-write of ``y`` for a bias;
- *statistics*: one read of ``y`` (``2nV`` or ``4nV``), one ``exp`` per logit (two with the softcap's ``tanh``);
- *objective*: the loss on the rows the chunk touches and its gradient w.r.t. their log-probs: dozens of tiny kernels;
- *logits gradient*: reads ``y`` and writes ``dL/dy`` (16-bit over the tile's first half for bf16/fp16 inputs on the
  Triton backend, fp32 in place otherwise), one ``exp`` per logit again;
- *gradient cast*: only where the gradient is not yet in the GEMMs' operand dtype (the torch backend on CUDA);
- *dX*: ``dX_c = G @ W``: ``2nHV`` FLOPs, reads ``G`` and ``W``, writes the chunk's own fp32 rows of ``dX``;
- *dW*: ``dW += G.T @ X_c``: ``2nHV`` FLOPs, reads ``G`` and ``X_c``, and reads and writes the whole fp32 ``dW``
  (``8VH`` bytes) once per chunk: the term that makes small chunks slow;
- *bias gradient*: a column sum of ``G``;
- after the last chunk, *finish* (the objective over the batch and TRL's metrics) and *gradient output* (``dW`` and
  ``dX`` scaled by the incoming gradient and cast to the inputs' dtype in one pass);
- the *one-chunk* schedule (a single pass whose one chunk holds the whole batch) keeps its tile for the backward,
  which forms ``G`` from it with the incoming gradient and writes ``dX`` and ``dW`` once, in the inputs' dtypes: no
  accumulator, no read-modify-write, no gradient output pass;
- *host*: the time the device waits for the host (:func:`host_wait`).

With the head split over ``k`` ranks (``Problem.tensor_parallel``; ``vocab`` is then one rank's largest shard), each
scoring chunk adds a *statistics exchange* and the backward a *dX sum* over the ranks, costed on the profile's link
(:mod:`.comm`), plus the call's *handshake*.

A stage's time is the roofline bound ``max(FLOPs / F, bytes / B, exps / E)`` plus a fixed cost per kernel, with ``F``,
``B`` and ``E`` from the :class:`DeviceProfile`; the host stage's is :func:`host_wait`'s. The floor is the same model
applied to the three bare GEMMs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from . import comm
from .devices import DeviceProfile, dtype_key

# Tiny kernels of the per-chunk objective epilogue (placing the chunk's log-probs into its rows, the objective,
# its autograd backward) and of the final objective + metrics; counted with torch.profiler on the GSPO objective
# (tests/test_plan_cost.py keeps these honest against a fresh count).
OBJECTIVE_KERNELS_PER_CHUNK = 45
FINISH_KERNELS = 65
# The host reads the device once per call (the checks of values and the counts, in one transfer:
# fused_gspo.host_values; tests/test_host_values.py counts them)
HOST_READS_PER_CALL = 1


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class Problem:
    """The call being planned: ``tokens`` valid tokens, hidden size, vocabulary, the compute dtype (the inputs'
    promoted dtype, or autocast's), which gradients are wanted, and the dtype they are handed back in
    (``output_dtype``, the parameters' own; None: the compute dtype)."""

    tokens: int
    hidden: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    hidden_grad: bool = True
    weight_grad: bool = True
    bias: bool = False
    softcap: bool = False
    output_dtype: torch.dtype | None = None

    @property
    def out_dtype(self) -> torch.dtype:
        return self.dtype if self.output_dtype is None else self.output_dtype

    # ranks the vocabulary is split over (fused_gspo.parallel): ``vocab`` is then one rank's (largest) shard, and
    # ``sequence_parallel`` says the hidden gradient is reduce-scattered rather than all-reduced
    tensor_parallel: int = 1
    sequence_parallel: bool = False

    @property
    def stats_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def wants_grad(self) -> bool:
        return self.hidden_grad or self.weight_grad


@dataclass(frozen=True)
class ChunkFormat:
    """How a backend holds one chunk: the dtypes and buffers that decide its bytes
    (:mod:`fused_gspo.precision` decides the dtypes; :func:`fused_gspo.plan.runtime.chunk_format` builds this).

    ``stats_dtype``: the per-token statistics' dtype (fp32; fp64 for fp64 inputs). ``tile_dtype``: the logits tile's
    (the staging dtype: the 16-bit compute dtype, or the stats dtype). ``temporaries``: extra tile-sized buffers, in
    the stats dtype, the tile ops allocate. ``grad_dtype``: what the logits-gradient kernel writes (over the tile).
    ``operand_dtype``: the gradient GEMMs' operand dtype (the compute dtype on CUDA, the stats dtype elsewhere); a
    gradient in another dtype is converted (one more pass and one more buffer). ``projection_dtype``: the projection
    GEMM's operands (the tile's own dtype when it is 16-bit: the GEMM writes the staged tile directly).
    ``compute_dtype``: what the inputs are rounded to before any GEMM (autocast's dtype under autocast).
    ``convert_hidden``: the hidden chunk is cast for the GEMMs.
    """

    stats_dtype: torch.dtype
    temporaries: int
    grad_dtype: torch.dtype
    operand_dtype: torch.dtype
    convert_hidden: bool = False
    tile_dtype: torch.dtype | None = None  # None: the stats dtype
    projection_dtype: torch.dtype | None = None  # None: the operand dtype
    compute_dtype: torch.dtype | None = None  # None: the operand dtype

    @property
    def tile(self) -> torch.dtype:
        return self.stats_dtype if self.tile_dtype is None else self.tile_dtype

    @property
    def projection(self) -> torch.dtype:
        return self.operand_dtype if self.projection_dtype is None else self.projection_dtype

    @property
    def compute(self) -> torch.dtype:
        return self.operand_dtype if self.compute_dtype is None else self.compute_dtype

    @property
    def staged_16bit(self) -> bool:
        return self.tile != self.stats_dtype

    @property
    def convert_grad(self) -> bool:
        return self.grad_dtype != self.operand_dtype

    def bytes_per_token(self, vocab: int, hidden: int) -> int:
        """Workspace bytes one token of a chunk takes: its logits row, the tile ops' temporaries, a converted copy of
        its gradient row, a converted copy of its hidden row."""
        row = vocab * (_bytes(self.tile) + _bytes(self.stats_dtype) * self.temporaries)
        if self.convert_grad:
            row += vocab * _bytes(self.operand_dtype)
        if self.convert_hidden:
            row += hidden * _bytes(self.operand_dtype)
        return row


@dataclass
class Stage:
    """One stage of one chunk (or of the whole call): work, traffic and the number of kernels it launches."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    exps: float = 0.0
    kernels: int = 1
    operands: str | None = None  # a GEMM's operand key for DeviceProfile.gemm_flops ("bf16", "fp32", "tf32", ...)
    host_seconds: float = 0.0  # time the device waits for the host (the "host" stage only)
    wire_bytes: float = 0.0  # bytes one rank sends to the others (a collective of a vocabulary-parallel call)
    collectives: int = 0  # collectives launched: each pays the link's latency

    def seconds(self, profile: DeviceProfile) -> tuple[float, str]:
        """``(time, bound)``: the roofline bound (compute, memory, exp or link) plus the kernels' and the
        collectives' fixed costs; the host stage's own time."""
        if self.host_seconds:
            return self.host_seconds, "host"
        terms = {"memory": self.bytes / profile.stream_bandwidth, "exp": self.exps / profile.exp_rate}
        if self.flops:
            terms["compute"] = self.flops / profile.gemm_flops(self.operands)
        if self.collectives:
            terms["link"] = self.wire_bytes / profile.link_rate
        bound = max(terms, key=terms.get)
        launches = self.kernels * profile.small_kernel_us * 1e-6
        latency = self.collectives * profile.link_latency_us * 1e-6
        seconds = terms[bound] + launches + latency
        if launches + latency > terms[bound]:
            bound = "latency" if latency > launches else "launch"
        return seconds, bound


def _gemm(name, m, n, k, operand_bytes, out_bytes, dtype, *, accumulate=False, extra_bytes=0.0) -> Stage:
    """``[m, k] @ [k, n]``: reads both operands once, writes (and with ``accumulate`` first reads) the output."""
    traffic = (m * k + k * n) * operand_bytes + m * n * out_bytes * (2 if accumulate else 1) + extra_bytes
    return Stage(name, flops=2.0 * m * n * k, bytes=traffic, operands=dtype_key(dtype))


def projection(p: Problem, fmt: ChunkFormat, n: int) -> Stage:
    ob, tb = _bytes(fmt.projection), _bytes(fmt.tile)
    stage = _gemm("projection", n, p.vocab, p.hidden, ob, tb, fmt.projection)
    if fmt.convert_hidden:
        stage.bytes += n * p.hidden * (_bytes(p.dtype) + ob)
        stage.kernels += 1
    if p.bias:
        stage.bytes += 2 * n * p.vocab * tb + p.vocab * _bytes(p.dtype)
        stage.kernels += 1
    return stage


def statistics(p: Problem, fmt: ChunkFormat, n: int) -> Stage:
    logits = n * p.vocab
    return Stage(
        "statistics",
        bytes=logits * _bytes(fmt.tile),
        exps=logits * (2 if p.softcap else 1),
        kernels=2,  # the split kernel and the merge of its partials
    )


def objective(kernels: int = OBJECTIVE_KERNELS_PER_CHUNK) -> Stage:
    return Stage("objective", kernels=kernels)


def logits_gradient(p: Problem, fmt: ChunkFormat, n: int) -> Stage:
    logits = n * p.vocab
    traffic = logits * (_bytes(fmt.tile) + _bytes(fmt.grad_dtype))
    return Stage("logits gradient", bytes=traffic, exps=logits * (2 if p.softcap else 1))


def gradient_cast(p: Problem, fmt: ChunkFormat, n: int) -> Stage:
    logits = n * p.vocab
    return Stage("gradient cast", bytes=logits * (_bytes(fmt.grad_dtype) + _bytes(fmt.operand_dtype)))


def grad_hidden(p: Problem, fmt: ChunkFormat, n: int, direct: bool = False) -> Stage:
    """``dX_c = G @ W``: into the fp32 accumulator's rows, or (``direct``: the one-chunk schedule) straight into the
    gradient handed back, in the inputs' dtype."""
    out = _bytes(p.out_dtype) if direct else _bytes(torch.promote_types(torch.float32, fmt.operand_dtype))
    # each chunk owns its rows of dX: written once, not accumulated
    return _gemm("dX", n, p.hidden, p.vocab, _bytes(fmt.operand_dtype), out, fmt.operand_dtype)


def grad_weight(p: Problem, fmt: ChunkFormat, n: int, direct: bool = False) -> Stage:
    """``dW += G.T @ X_c`` into the fp32 accumulator, or (``direct``) ``dW = G.T @ X`` written once in the weight's
    dtype: no read-modify-write, no cast pass."""
    if direct:
        return _gemm("dW", p.vocab, p.hidden, n, _bytes(fmt.operand_dtype), _bytes(p.out_dtype), fmt.operand_dtype)
    acc = _bytes(torch.promote_types(torch.float32, fmt.operand_dtype))
    return _gemm("dW", p.vocab, p.hidden, n, _bytes(fmt.operand_dtype), acc, fmt.operand_dtype, accumulate=True)


def grad_bias(p: Problem, fmt: ChunkFormat, n: int) -> Stage:
    return Stage("bias gradient", bytes=n * p.vocab * _bytes(fmt.operand_dtype))


def finish(kernels: int = FINISH_KERNELS) -> Stage:
    return Stage("finish", kernels=kernels)


def gradient_output(p: Problem, fmt: ChunkFormat) -> Stage:
    """``dW`` and ``dX`` scaled by the incoming gradient and cast to the inputs' dtype, one pass each."""
    acc = _bytes(torch.promote_types(torch.float32, fmt.operand_dtype))
    out = _bytes(p.out_dtype)
    elements = (p.vocab * p.hidden if p.weight_grad else 0) + (p.tokens * p.hidden if p.hidden_grad else 0)
    elements += p.vocab if p.bias else 0
    kernels = int(p.weight_grad) + int(p.hidden_grad) + int(p.bias)
    return Stage("gradient output", bytes=elements * (acc + out), kernels=kernels)


def statistics_exchange(p: Problem, fmt: ChunkFormat, n: int) -> Stage:
    """The all-gather of a chunk's per-token partial statistics, and their merge (a dozen tiny kernels)."""
    wire = comm.statistics_exchange_bytes(n, p.tensor_parallel, _bytes(fmt.stats_dtype))
    merged = n * p.tensor_parallel * comm.STATISTICS_FLOATS * _bytes(fmt.stats_dtype)
    return Stage("statistics exchange", bytes=2 * merged, kernels=12, wire_bytes=wire, collectives=1)


def hidden_grad_sum(p: Problem, fmt: ChunkFormat) -> Stage:
    """``dX`` summed over the ranks once: all-reduced in fp32 before the gradient output, or (sequence parallelism)
    reduce-scattered by DTensor afterwards, in the inputs' dtype."""
    width = _bytes(p.dtype) if p.sequence_parallel else _bytes(torch.promote_types(torch.float32, fmt.operand_dtype))
    wire = comm.hidden_grad_bytes(p.tokens, p.hidden, p.tensor_parallel, width, p.sequence_parallel)
    return Stage("dX sum over ranks", bytes=2 * p.tokens * p.hidden * width, kernels=0, wire_bytes=wire, collectives=1)


def hidden_gather(p: Problem) -> Stage:
    """Sequence parallelism: the hidden states' shards gathered (by DTensor) before the call."""
    wire = comm.all_gather_bytes(p.tokens * p.hidden * _bytes(p.dtype) / p.tensor_parallel, p.tensor_parallel)
    return Stage("hidden gather", bytes=2 * p.tokens * p.hidden * _bytes(p.dtype), kernels=0, wire_bytes=wire,
                 collectives=1)  # fmt: skip


def handshake(p: Problem) -> Stage:
    wire = comm.all_gather_bytes(8 * comm.HANDSHAKE_INTS, p.tensor_parallel)
    return Stage("handshake", kernels=4, wire_bytes=wire, collectives=1)


# --------------------------------------------------------------------------------------------------------------------
# Schedules

STRATEGIES = ("single_pass", "two_phase")
MODES = ("fwd_bwd", "fwd", "logprobs")


def chunk_stages(p: Problem, fmt: ChunkFormat, n: int, phase: str) -> list[Stage]:
    """The stages of one chunk of ``n`` tokens. ``phase``: ``"score"`` (projection and statistics: the two-phase
    forward), ``"single_pass"`` (everything, the gradient formed on the spot), ``"recompute"`` (the two-phase
    backward: the projection again, then the gradient), ``"one_chunk"`` (the single pass over the whole batch: the
    staged tile kept for the backward, which forms the gradient from it and writes ``dX`` and ``dW`` once, in the
    inputs' dtypes) or ``"one_chunk_forward"`` (that schedule's forward alone)."""
    stages = [projection(p, fmt, n)]
    if phase in ("score", "single_pass", "one_chunk", "one_chunk_forward"):
        stages.append(statistics(p, fmt, n))
        if p.tensor_parallel > 1:
            stages.append(statistics_exchange(p, fmt, n))
    if phase in ("single_pass", "one_chunk", "one_chunk_forward"):
        stages.append(objective())
    if phase in ("single_pass", "recompute", "one_chunk"):
        direct = phase == "one_chunk"
        stages.append(logits_gradient(p, fmt, n))
        if fmt.convert_grad:
            stages.append(gradient_cast(p, fmt, n))
        if p.hidden_grad:
            stages.append(grad_hidden(p, fmt, n, direct))
        if p.weight_grad:
            stages.append(grad_weight(p, fmt, n, direct))
        if p.bias:
            stages.append(grad_bias(p, fmt, n))
    return stages


def one_chunk(p: Problem, sizes: list[int], strategy: str) -> bool:
    """Whether the driver runs ``strategy`` over ``sizes`` as the one-chunk schedule (``chunked.single_pass``): a
    single pass whose one chunk holds every token, with a gradient to form."""
    return strategy == "single_pass" and len(sizes) == 1 and p.wants_grad


@dataclass
class StageRow:
    """One row of a plan's table: a stage summed over the chunks."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    ms: float = 0.0
    bound: str = ""
    count: int = 0  # how many times it runs (chunks)
    wire_bytes: float = 0.0  # sent to the other ranks (vocabulary-parallel calls)
    _bound_ms: dict = field(default_factory=dict, repr=False)

    def add(self, stage: Stage, profile: DeviceProfile, times: int = 1) -> None:
        seconds, bound = stage.seconds(profile)
        self.flops += stage.flops * times
        self.bytes += stage.bytes * times
        self.wire_bytes += stage.wire_bytes * times
        self.ms += seconds * 1e3 * times
        self.count += times
        self._bound_ms[bound] = self._bound_ms.get(bound, 0.0) + seconds * times
        self.bound = max(self._bound_ms, key=self._bound_ms.get)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "flops": self.flops,
            "bytes": self.bytes,
            "ms": self.ms,
            "bound": self.bound,
            "count": self.count,
            "wire_bytes": self.wire_bytes,
        }


@dataclass
class Costing:
    """A schedule's predicted time, summed per stage name (``totals``), from the stages of each chunk phase run
    (``phases``: one ``(phase, size, stages)`` per run, in order) and of the call's ``tail``."""

    phases: list[tuple[str, int, list[Stage]]]
    tail: list[Stage]
    totals: list[StageRow]
    ms: float

    def per_chunk(self) -> list[list[Stage]]:
        """Every chunk's stages, in the order they run."""
        return [stages for _, _, stages in self.phases]


# A one-chunk phase's stages that run in the forward; the rest run in the backward, after the objective's finish
_FORWARD_STAGES = ("projection", "statistics", "statistics exchange", "objective")


def schedule_cost(
    p: Problem, fmt: ChunkFormat, sizes: list[int], strategy: str, mode: str, profile: DeviceProfile
) -> Costing:
    """Predicted cost of running chunks of ``sizes`` tokens with ``strategy`` in ``mode``, the device's wait for the
    host included (a ``"host"`` row, from the stages in the order the host launches them). Chunks of equal size are
    costed once."""
    runs: list[tuple[str, list[int]]] = []
    before: list[Stage] = []  # the call's prologue
    after: list[Stage] = []  # the objective over the batch, then the backward's tail
    if mode == "logprobs" or strategy == "two_phase":
        runs.append(("score", sizes))
        if mode != "logprobs":
            after.append(finish())
        if mode == "fwd_bwd":
            runs.append(("recompute", sizes))
    elif one_chunk(p, sizes, strategy):
        runs.append(("one_chunk" if mode == "fwd_bwd" else "one_chunk_forward", sizes))
        after.append(finish())
    else:
        runs.append(("single_pass", sizes))
        after.append(finish())
    if p.tensor_parallel > 1:
        before.append(handshake(p))
        if p.sequence_parallel:
            before.insert(0, hidden_gather(p))
        if mode == "fwd_bwd" and p.hidden_grad:
            after.append(hidden_grad_sum(p, fmt))
    if mode == "fwd_bwd" and p.wants_grad and not one_chunk(p, sizes, strategy):
        after.append(gradient_output(p, fmt))
    totals: dict[str, StageRow] = {}
    phases = []
    for phase, run_sizes in runs:
        stages_of = {n: chunk_stages(p, fmt, n, phase) for n in set(run_sizes)}
        counts = Counter(run_sizes)
        for n in sorted(stages_of):
            for stage in stages_of[n]:
                totals.setdefault(stage.name, StageRow(stage.name)).add(stage, profile, counts[n])
        phases += [(phase, n, stages_of[n]) for n in run_sizes]
    tail = [*before, *after]
    tail.append(host_wait(_launch_order(phases, before, after), profile))
    for stage in tail:
        totals.setdefault(stage.name, StageRow(stage.name)).add(stage, profile)
    rows = list(totals.values())
    return Costing(phases, tail, rows, sum(r.ms for r in rows))


def _launch_order(phases, before: list[Stage], after: list[Stage]) -> list[Stage]:
    """Every stage in the order the host launches it: the prologue, the forward's chunks, the objective's finish,
    then the backward (the two phases' recomputing chunks, or the one chunk's gradient), then the rest of ``after``."""
    finish_stages = [s for s in after if s.name == "finish"]
    rest = [s for s in after if s.name != "finish"]
    forward, backward = [], []
    for phase, _, stages in phases:
        if phase == "recompute":
            backward += stages
        elif phase == "one_chunk":
            forward += [s for s in stages if s.name in _FORWARD_STAGES]
            backward += [s for s in stages if s.name not in _FORWARD_STAGES]
        else:
            forward += stages
    return [*before, *forward, *finish_stages, *backward, *rest]


def host_wait(stages: list[Stage], profile: DeviceProfile) -> Stage:
    """The time the device sits idle waiting for the host.

    The call's :data:`HOST_READS_PER_CALL` reads each drain the queue and leave the device idle for
    :attr:`DeviceProfile.host_read_us`. After that the host launches every kernel in order, one per
    :attr:`DeviceProfile.host_launch_us` (Python and autograd included), and the device runs each as soon as it is
    launched and the previous one is done. A chunk's GEMMs take milliseconds, so the host runs ahead of them and
    the tiny kernels that follow cost no idle time; a run of tiny kernels on an empty queue does.
    """
    read = HOST_READS_PER_CALL * profile.host_read_us * 1e-6
    launch = profile.host_launch_us * 1e-6
    host = device = idle = read  # both clocks start when the last read returns the device to the host
    for stage in stages:
        k = stage.kernels
        if k == 0:
            continue
        d = stage.seconds(profile)[0] / k
        # k kernels, launched at host + j * launch, each running d after the previous one: the device finishes at
        # the latest of (all queued behind what it has) and (launch j, then the k - j + 1 kernels left)
        busy_end = device + k * d
        end = max(busy_end, host + k * launch + d if launch > d else host + launch + k * d)
        idle += end - busy_end
        host, device = host + k * launch, end
    return Stage("host", kernels=0, host_seconds=idle)


def floor_cost(p: Problem, mode: str, profile: DeviceProfile) -> Costing:
    """The bare GEMMs at the same shapes and dtype, unchunked, 16-bit outputs: ``X @ W.T`` (+ ``G @ W`` and
    ``G.T @ X`` for fwd_bwd). What the benchmark's ``floor`` contender runs."""
    b = _bytes(p.dtype)
    stages = [_gemm("projection", p.tokens, p.vocab, p.hidden, b, b, p.dtype)]
    if mode == "fwd_bwd":
        stages.append(_gemm("dX", p.tokens, p.hidden, p.vocab, b, b, p.dtype))
        stages.append(_gemm("dW", p.vocab, p.hidden, p.tokens, b, b, p.dtype))
    totals = []
    for stage in stages:
        total = StageRow(stage.name)
        total.add(stage, profile)
        totals.append(total)
    return Costing([("floor", p.tokens, stages)], [], totals, sum(t.ms for t in totals))


# --------------------------------------------------------------------------------------------------------------------
# Memory


def peak_bytes(p: Problem, fmt: ChunkFormat, widest: int, strategy: str, mode: str, weight_copy: bool) -> int:
    """Predicted peak of the call above its inputs: the workspace of the widest chunk, the fp32 gradient
    accumulators, the gradients handed back, a converted copy of the weight (``weight_copy``), and the O(N) per-token
    statistics. The one-chunk schedule has no accumulators: its tile lives until the backward writes the gradients
    from it."""
    acc = _bytes(torch.promote_types(torch.float32, fmt.operand_dtype))
    out = _bytes(p.out_dtype)
    workspace = widest * fmt.bytes_per_token(p.vocab, p.hidden)
    stats = p.tokens * 8 * _bytes(fmt.stats_dtype)  # log-probs, entropies, log-sum-exps, their [B, T] scatters
    weight = p.vocab * p.hidden * _bytes(fmt.operand_dtype) if weight_copy else 0
    if mode == "logprobs":
        return workspace + weight + stats
    grad = mode == "fwd_bwd" or strategy == "single_pass"
    accumulators = 0
    outputs = 0
    if grad and p.weight_grad:
        accumulators += p.vocab * p.hidden * acc
        outputs += p.vocab * p.hidden * out
    if grad and p.hidden_grad:
        accumulators += p.tokens * p.hidden * acc
        outputs += p.tokens * p.hidden * out
    if grad and p.bias:
        accumulators += p.vocab * acc
        outputs += p.vocab * out
    if one_chunk(p, [widest], strategy) and widest == p.tokens:
        at_backward = workspace + weight + stats + (outputs if mode == "fwd_bwd" else 0)
        return int(at_backward)
    during_chunks = workspace + weight + stats + accumulators
    at_output = accumulators + outputs + stats if mode == "fwd_bwd" else 0
    return int(max(during_chunks, at_output))
