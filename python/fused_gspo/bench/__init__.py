"""``fused-gspo-bench``: time and memory of the LM-head policy loss, ours side by side with the alternatives.

For one objective (loss type, importance-sampling level, beta) and one shape (``N`` tokens, hidden size ``H``,
vocabulary ``V``, dtype), every contender runs up to three modes on the same random inputs:

- ``fwd``: the forward of a training step. The inputs require grad, so whatever a contender does in its forward for
  the backward's sake (keeping the logits, or forming the gradient on the spot) is counted;
- ``fwd_bwd``: that forward plus ``torch.autograd.grad`` of the loss with respect to ``hidden`` and ``weight``;
- ``logprobs``: the no-grad pass that scores the valid tokens (how ``old_logps`` / ``ref_logps`` are computed).

Contenders:

- ``eager``: ``fused_policy_loss(backend="eager")``, the full ``[N, V]`` logits in the input dtype;
- ``torch`` / ``triton``: ``fused_policy_loss(backend="torch" | "triton")``;
- ``trl``: TRL 1.16's own chunked LM head (``trl.kernels.ChunkedLogProbFunction``, called as ``add_fused_lm_head``
  calls it) on the valid tokens, scattered back to ``[B, T]``, then the loss math in eager PyTorch;
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (its own chunked head and loss);
- ``torch_lce``: PyTorch's ``torch.nn.functional.linear_cross_entropy(reduction="none",
  options=LinearCrossEntropyOptions())`` (torch >= 2.13; chunked) for the valid tokens' log-probs, then the same
  loss math as ``trl``; no entropy, softcapping or (except powers of two) logit scale: those are "unsupported";
- ``floor``: the bare GEMMs of the same shapes and dtype, ``X @ W.T`` (+ ``G @ W`` and ``G.T @ X`` for fwd_bwd).

With ``--objective dpo|cpo`` the objective is a preference loss (TRL 1.16's ``DPOTrainer`` / ``CPOTrainer``) in TRL's
concatenated layout (``2B`` rows, chosen then rejected) and the contenders are ``eager`` / ``torch`` / ``triton``
(``fused_preference_loss``), ``trl`` (DPO: ``ChunkedLogProbFunction`` with the outputs ``DPOTrainer`` asks for, then its
loss math; CPO: ``CPOTrainer``'s full logits and its own ``get_batch_logps`` / ``cpo_loss``), ``liger``
(``LigerFusedLinear{DPO,CPO,SimPO}Loss``, DPO with its own reference pass) and ``floor``; ``logprobs`` is DPO's
reference pass (``[2B]`` sequence log-probs). See :mod:`.preference_problem`, :mod:`.preference_contenders` and
:mod:`.preference_cli`.

Method: warm-up runs are excluded; each figure is the median of ``--repeats`` runs with its min/max; CUDA events
(with a synchronize before each run) on GPU, ``time.perf_counter`` on CPU. Before a contender is timed its loss,
``dL/dhidden`` and ``dL/dweight`` (or its log-probs) are compared with a reference: the float64 eager path at small
shapes, else our ``torch`` backend on float32 copies of the inputs. Peak memory is measured in a separate run, above
what was allocated before it (inputs, reference): ``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) on CPU. Each run also records the planner's prediction for its
layout (``fused_gspo.explain``, per mode); ``--explain`` prints that plan without running anything.

Modules: :mod:`.cli` (arguments, settings, ``main``), :mod:`.problem` (shapes, inputs, reference, check),
:mod:`.contenders`, :mod:`.measure` (timing, memory, :class:`Result`, ``measure.measure``: the submodule's name is
not shadowed by the function), :mod:`.report` (table, plot, environment), :mod:`.planning` (``--explain`` and the
recorded plans).
"""

from .cli import build_parser, main, resolve_settings, run_benchmark
from .contenders import (
    CONTENDERS,
    Contender,
    FusedGspo,
    GemmFloor,
    Liger,
    TorchLinearCrossEntropy,
    TrlChunked,
    build_contenders,
)
from .measure import (
    FLOPS_PER_NHV,
    CudaMemory,
    MemoryProbe,
    ProcessMemory,
    Result,
    is_oom,
    summarize,
    time_runs,
)
from .planning import default_profile, profile_choices, recorded_plans, run_explain, run_plans
from .preference_contenders import (
    PREFERENCE_CONTENDERS,
    PreferenceFused,
    PreferenceLiger,
    PreferenceTrl,
    build_preference_contenders,
)
from .preference_problem import (
    PreferenceInputs,
    PreferenceObjective,
    compute_preference_reference,
    make_preference_inputs,
    preference_seq_len,
)
from .problem import (
    CPU_DEFAULTS,
    DTYPES,
    GPU_DEFAULTS,
    MODELS,
    MODES,
    TOLERANCES,
    Inputs,
    ModelPreset,
    Reference,
    Shape,
    check_outputs,
    compute_reference,
    default_seq_len,
    layout_row_lengths,
    make_inputs,
    relative_error,
)
from .report import Progress, check_label, device_info, format_notes, format_table, library_versions, write_plot
from .settings import Settings

__all__ = [
    "CONTENDERS",
    "CPU_DEFAULTS",
    "DTYPES",
    "FLOPS_PER_NHV",
    "GPU_DEFAULTS",
    "MODELS",
    "MODES",
    "PREFERENCE_CONTENDERS",
    "TOLERANCES",
    "Contender",
    "CudaMemory",
    "FusedGspo",
    "GemmFloor",
    "Inputs",
    "Liger",
    "MemoryProbe",
    "ModelPreset",
    "PreferenceFused",
    "PreferenceInputs",
    "PreferenceLiger",
    "PreferenceObjective",
    "PreferenceTrl",
    "ProcessMemory",
    "Progress",
    "Reference",
    "Result",
    "Settings",
    "Shape",
    "TorchLinearCrossEntropy",
    "TrlChunked",
    "build_contenders",
    "build_preference_contenders",
    "build_parser",
    "check_label",
    "check_outputs",
    "compute_preference_reference",
    "compute_reference",
    "default_profile",
    "default_seq_len",
    "device_info",
    "format_notes",
    "format_table",
    "is_oom",
    "layout_row_lengths",
    "library_versions",
    "main",
    "make_inputs",
    "make_preference_inputs",
    "preference_seq_len",
    "profile_choices",
    "recorded_plans",
    "relative_error",
    "resolve_settings",
    "run_benchmark",
    "run_explain",
    "run_plans",
    "summarize",
    "time_runs",
    "write_plot",
]
