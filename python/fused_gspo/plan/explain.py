"""``explain``: the plan for a shape, objective, dtype, budget and device profile, without running anything.

It goes through the same planner as a real call (:func:`fused_gspo.plan.planner.choose`), so what it prints is what
``fused_policy_loss`` would do on that device, and what the cost model predicts of it. ``docs/design.md`` ("Reading
``explain``") walks through a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .cost import MODES, Problem, StageRow
from .devices import DeviceProfile, dtype_key, get_profile
from .planner import ChunkPlan, auto_workspace_bytes, choose
from .runtime import chunk_format, free_device_bytes

GIB = float(1 << 30)
DEFAULT_ROW_LENGTH = 512  # rows of the benchmark's default layout, when no row lengths are given


@dataclass
class Plan:
    """What the planner chose for one call, and the cost model's prediction of it.

    ``stages``: one row per stage summed over the chunks (name, FLOPs, bytes, predicted ms, the bound that applies,
    how many times it runs); ``chunks``: the same rows for every chunk. ``floor_ms``: the three bare GEMMs (one for
    ``mode="logprobs"``) on the same profile; ``ratio = predicted_ms / floor_ms``. ``peak_bytes``: predicted peak
    above the inputs.
    """

    device: str
    profile: str
    backend: str
    mode: str
    tokens: int
    hidden: int
    vocab: int
    dtype: str
    objective: str
    coupling: str
    strategy: str
    chunk_tokens: int
    num_chunks: int
    workspace_bytes: int
    workspace_auto: bool
    stages: list[StageRow]
    chunks: list[list[StageRow]]
    predicted_ms: float
    floor_ms: float
    peak_bytes: int
    alternatives: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    compute_dtype: str = ""  # the GEMMs' operands (autocast's dtype under autocast)
    logits_dtype: str = ""  # what each chunk's logits tile is staged in
    # the vocabulary split over this many ranks (fused_gspo.parallel): every figure is one rank's, on its shard
    tensor_parallel: int = 1
    shard_vocab: int = 0
    wire_bytes: float = 0.0  # sent by one rank to the others over the call

    @property
    def wire_bytes_per_token(self) -> float:
        return self.wire_bytes / self.tokens if self.tokens else 0.0

    @property
    def ratio(self) -> float:
        return self.predicted_ms / self.floor_ms if self.floor_ms else float("inf")

    def to_dict(self, per_chunk: bool = False) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("stages", "chunks")}
        out["ratio"] = self.ratio
        out["stages"] = [row.as_dict() for row in self.stages]
        if per_chunk:
            out["chunks"] = [[row.as_dict() for row in chunk] for chunk in self.chunks]
        return out

    def __str__(self) -> str:
        budget = f"{self.workspace_bytes / GIB:.2f} GiB" + (" (auto)" if self.workspace_auto else "")
        split = self.tensor_parallel > 1
        vocab = f"V={self.vocab}" + (
            f" over {self.tensor_parallel} ranks ({self.shard_vocab} rows each)" if split else ""
        )
        lines = [
            f"fused_gspo plan | N={self.tokens} tokens, H={self.hidden}, {vocab}, {self.dtype}, {self.mode} | "
            f"{self.objective} ({self.coupling} coupling)",
            f"{self.compute_dtype} GEMMs, logits staged in {self.logits_dtype}",
            f"device profile {self.profile}: {self.device} | {self.rates_line()}",
            f"backend {self.backend} | workspace {budget} | {self.schedule_line()}",
            "",
        ]
        header = ("stage", "runs", "GFLOP", "GB moved", *(("MB sent",) if split else ()), "ms", "bound")
        rows = [
            (r.name, str(r.count), f"{r.flops / 1e9:.1f}", f"{r.bytes / 1e9:.2f}",
             *((f"{r.wire_bytes / 1e6:.2f}",) if split else ()), f"{r.ms:.3f}", r.bound)
            for r in self.stages
        ]  # fmt: skip
        blank = ("",) * (len(header) - 3)
        rows.append(("total (predicted)", *blank, f"{self.predicted_ms:.3f}", ""))
        rows.append(("floor (bare GEMMs)", *blank, f"{self.floor_ms:.3f}", ""))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, tuple("-" * w for w in widths), *rows]:
            cells = (
                c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            lines.append("  ".join(cells).rstrip())
        lines.append("")
        peak = f"predicted peak {self.peak_bytes / GIB:.2f} GiB above the inputs"
        lines.append(f"ratio to the floor {self.ratio:.3f}x | {peak}" + (" (per rank)" if split else ""))
        if split:
            lines.append(
                f"each rank sends {self.wire_bytes / 1e6:.2f} MB to the others ({self.wire_bytes_per_token:.0f} B per "
                f"token) over a {self.rates['link_gbs']:.0f} GB/s link"
            )
        others = {k: v for k, v in self.alternatives.items() if k != self.strategy}
        if others:
            lines.append("best alternative: " + ", ".join(f"{k} {v:.3f} ms" for k, v in others.items()))
        return "\n".join(lines)

    def schedule_line(self) -> str:
        line = f"{self.strategy}: {self.num_chunks} chunk(s) of up to {self.chunk_tokens} tokens"
        if any(row.name == "dW" for row in self.stages) and not any(r.name == "gradient output" for r in self.stages):
            line += " (one chunk: the gradient formed in the backward from the kept tile, dW and dX written once)"
        return line

    def rates_line(self) -> str:
        r = self.rates
        gemm = f"{r['gemm_tflops']:.0f} TFLOP/s" if r["gemm_tflops"] >= 10 else f"{r['gemm_tflops'] * 1e3:.0f} GFLOP/s"
        return (
            f"GEMM {gemm} ({r['gemm_dtype']}), memory {r['bandwidth_tbs']:.2f} TB/s, "
            f"{r['small_kernel_us']:.0f} us per small kernel"
        )


def _row_counts(tokens: int, row_lengths: int | Sequence[int] | None) -> list[int]:
    if row_lengths is None:
        row_lengths = DEFAULT_ROW_LENGTH
    if isinstance(row_lengths, int):
        if row_lengths < 1:
            raise ValueError(f"row_lengths must be >= 1, got {row_lengths}")
        full, rest = divmod(tokens, row_lengths)
        return [row_lengths] * full + ([rest] if rest else [])
    counts = [int(c) for c in row_lengths]
    if any(c < 0 for c in counts) or sum(counts) != tokens:
        raise ValueError(f"row_lengths must be non-negative and sum to tokens={tokens}, got a sum of {sum(counts)}")
    return counts


def explain(
    tokens: int,
    hidden: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | DeviceProfile = "h100",
    workspace_bytes: int | str = "auto",
    config=None,
    row_lengths: int | Sequence[int] | None = None,
    mode: str = "fwd_bwd",
    backend: str = "auto",
    on_policy: bool = False,
    sampling_logps: bool = False,
    bias: bool = False,
    autocast: torch.dtype | None = None,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    **config_overrides,
) -> Plan:
    """The plan ``fused_policy_loss`` makes for ``tokens`` valid tokens, hidden size ``hidden`` and vocabulary
    ``vocab`` on ``device`` (a profile name such as ``"h100"``, ``"b200"``, ``"cpu"``; ``"cuda"`` for the current GPU).

    ``config`` / ``config_overrides``: the objective (a :class:`fused_gspo.PolicyLossConfig` and/or its fields).
    ``row_lengths``: valid tokens per sequence (an int for equal rows; default 512), which bound the chunks when the
    gradient is sequence-coupled. ``on_policy``: whether ``old_logps`` is None (on-policy makes most objectives
    token-coupled). ``sampling_logps``: whether the sampler's log-probs are given (an off-policy mask then reads them,
    which couples each sequence even on-policy). ``mode``: ``"fwd_bwd"``, ``"fwd"`` or ``"logprobs"`` (the no-grad
    pass). ``backend``: ``"auto"`` (triton on a GPU profile, torch on ``"cpu"``), ``"torch"`` or ``"triton"``.
    ``autocast``: the dtype of a ``torch.autocast`` region the call runs in (``dtype`` is then the inputs', e.g. fp32
    master weights): the GEMMs and the staging follow it, as in a real call. The config's ``logits_dtype`` picks the
    staging.
    ``tensor_parallel``: the vocabulary split over this many ranks (:mod:`fused_gspo.parallel`): the plan of one
    rank, on its shard of ``ceil(V / k)`` rows, with the statistics exchange per chunk and the ``dX`` sum on the
    profile's link (``sequence_parallel``: the hidden states arrive sharded over the sequence, gathered before the
    call, their gradient reduce-scattered). Works without a GPU.
    """
    from ..api import _resolve_config  # noqa: PLC0415  (the API imports the planner)
    from ..backends import tile_ops_for  # noqa: PLC0415
    from ..config import validate_workspace_bytes  # noqa: PLC0415
    from ..objectives import coupling_of  # noqa: PLC0415

    for name, value in (("tokens", tokens), ("hidden", hidden), ("vocab", vocab)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "tokens" else 1):
            raise ValueError(
                f"{name} must be a {'non-negative' if name == 'tokens' else 'positive'} int, got {value!r}"
            )
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be a positive int, got {tensor_parallel!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be bf16, fp16, fp32 or fp64, got {dtype}")
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast}")
    validate_workspace_bytes(workspace_bytes)
    cfg = _resolve_config(config, config_overrides)
    profile = get_profile(device)
    if backend == "auto":
        backend = "triton" if profile.is_gpu else "torch"
    ops = tile_ops_for(backend)
    compute = autocast if (autocast is not None and dtype != torch.float64) else dtype
    fmt = chunk_format(ops, compute, profile.is_gpu, dtype, cfg.logits_dtype)
    operands = fmt.operand_dtype
    shard_vocab = -(-vocab // tensor_parallel)
    problem = Problem(
        tokens, hidden, shard_vocab, compute, bias=bias, softcap=cfg.final_logit_softcapping is not None,
        output_dtype=dtype, tensor_parallel=tensor_parallel,
        sequence_parallel=bool(sequence_parallel) and tensor_parallel > 1,
    )  # fmt: skip
    coupling = (
        "global" if mode == "logprobs" else coupling_of(cfg, on_policy=on_policy, has_sampling_logps=sampling_logps)
    )
    counts = _row_counts(tokens, row_lengths)
    auto = workspace_bytes == "auto"
    if auto:
        free = (
            free_device_bytes(torch.device(device)) if isinstance(device, str) and device.startswith("cuda") else None
        )
        workspace_bytes = auto_workspace_bytes(
            problem, fmt, coupling=coupling, row_counts=counts, profile=profile, mode=mode, free_bytes=free
        )
    plan: ChunkPlan = choose(
        problem,
        fmt,
        coupling=coupling,
        row_counts=counts,
        workspace_bytes=int(workspace_bytes),
        profile=profile,
        mode=mode,
        weight_copy=dtype != operands,
    )
    per_chunk = []
    for chunk in plan.costing.per_chunk():
        rows = []
        for stage in chunk:
            row = StageRow(stage.name)
            row.add(stage, profile)
            rows.append(row)
        per_chunk.append(rows)
    gemm_key = dtype_key(operands)
    return Plan(
        device=profile.description,
        profile=profile.name,
        backend=backend,
        mode=mode,
        tokens=tokens,
        hidden=hidden,
        vocab=vocab,
        dtype=str(dtype).replace("torch.", ""),
        objective=f"loss_type={cfg.loss_type} level={cfg.importance_sampling_level}"
        + ("" if mode == "logprobs" else f" {'on' if on_policy else 'off'}-policy"),
        coupling=coupling,
        strategy=plan.strategy,
        chunk_tokens=plan.chunk_tokens,
        num_chunks=plan.num_chunks,
        workspace_bytes=int(workspace_bytes),
        workspace_auto=auto,
        stages=plan.costing.totals,
        chunks=per_chunk,
        predicted_ms=plan.costing.ms,
        floor_ms=plan.floor.ms,
        peak_bytes=plan.peak_bytes,
        alternatives=plan.alternatives,
        rates={
            "gemm_tflops": profile.gemm_flops(gemm_key) / 1e12,
            "gemm_dtype": gemm_key,
            "bandwidth_tbs": profile.stream_bandwidth / 1e12,
            "small_kernel_us": profile.small_kernel_us,
            "link_gbs": profile.link_rate / 1e9,
        },
        compute_dtype=str(compute).replace("torch.", ""),
        logits_dtype=str(fmt.tile).replace("torch.", ""),
        tensor_parallel=tensor_parallel,
        shard_vocab=shard_vocab,
        wire_bytes=sum(row.wire_bytes for row in plan.costing.totals),
    )
