"""Device profiles: what the cost model needs to know about a machine.

A profile holds datasheet peaks (dense tensor-core FLOP/s per operand dtype, HBM bandwidth, memory) and the fraction
of each that real kernels reach (``gemm_efficiency``, ``bandwidth_efficiency``). The efficiencies are the cost model's
calibration knobs: 0.75 of the bf16 peak is what large cuBLAS GEMMs reach on an H100 (about 740 of 989 TFLOP/s) and
0.9 of the bandwidth what a streaming kernel reaches. Both were measured on an H100 SXM (2026-11-23,
``bench/gpu_checks.py``): 733 TFLOP/s for the bf16 GEMM at the LM head's shape and 3.02 TB/s for a device copy,
against the profile's 742 and 3.02 (``bench/results/gpu-h100-checks.json``); other devices are datasheet
figures (``docs/design.md``, "Calibrating the model"). ``small_kernel_us`` is the device time of one tiny kernel (the
objective's per-chunk epilogue is dozens of them).

Profiles are found from ``torch.cuda.get_device_name()`` (:func:`profile_for_device`) or by name (:func:`get_profile`,
which works on a machine without a GPU: ``explain(..., device="h100")``). A GPU missing from the table gets
:data:`UNKNOWN_GPU`, deliberately conservative, with its memory read from the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

GB = 1e9
TERA = 1e12


# compared and hashed by identity: one object per device model, which the planner's cache keys on
@dataclass(frozen=True, eq=False)
class DeviceProfile:
    """Peaks of one device model, and how much of them kernels reach."""

    name: str
    description: str
    # dense peak FLOP/s of a GEMM by operand dtype: "bf16", "fp16", "fp32" (plain FP32, what torch.mm runs with TF32
    # off, PyTorch's default), "tf32" (tensor cores)
    peak_flops: dict[str, float]
    bandwidth: float  # bytes/s of device memory (datasheet)
    memory_bytes: float
    multiprocessors: int
    clock_hz: float  # boost clock: with the multiprocessor count it gives the exp() throughput
    gemm_efficiency: float = 0.75
    bandwidth_efficiency: float = 0.9
    small_kernel_us: float = 3.0  # device time of a tiny elementwise kernel, launch latency included
    # The host side (cost.host_wait): the device's idle time per host read (the read drains the queue; the device
    # then waits for the host's Python up to the next launch) and the host time per kernel launch (Python and
    # autograd included). Fitted to the H100 profile of 2026-11-23 (bench/results/gpu-h100-profile.json): 4.9 ms
    # idle per call at the reference shape with the host reading 5 times before the first chunk, and the six
    # largest gaps (3.0 ms) around those reads; the kernels launched after them sit behind the chunks' GEMMs, so
    # the rest is the host's Python between the reads: about 1 ms per read. The code has read once per call since
    # (tests/test_host_values.py); refit on the next GPU run (bench/gpu_profile.py reports the idle time).
    host_read_us: float = 980.0
    host_launch_us: float = 20.0
    exp_per_clock_per_sm: int = 16  # special-function unit throughput (ex2) per multiprocessor
    is_gpu: bool = True
    # Between the ranks of a tensor-parallel group (one node): bytes/s each way per device, datasheet (NVLink where
    # the part has it, else PCIe); the share a collective reaches and its fixed latency are assumptions, not measured
    link_bandwidth: float = 32 * GB
    link_efficiency: float = 0.8
    link_latency_us: float = 15.0

    def gemm_flops(self, operands: str) -> float:
        """FLOP/s a large GEMM reaches with ``operands`` (a :func:`dtype_key`, or ``"tf32"``)."""
        return self.peak_flops[operands] * self.gemm_efficiency

    @property
    def stream_bandwidth(self) -> float:
        """Bytes/s a streaming (memory-bound) kernel reaches."""
        return self.bandwidth * self.bandwidth_efficiency

    @property
    def exp_rate(self) -> float:
        """exp() per second across the device."""
        return self.multiprocessors * self.exp_per_clock_per_sm * self.clock_hz

    @property
    def link_rate(self) -> float:
        """Bytes/s a large collective moves each way per device."""
        return self.link_bandwidth * self.link_efficiency

    def with_memory(self, memory_bytes: float) -> DeviceProfile:
        return dataclasses.replace(self, memory_bytes=memory_bytes)


_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_key(dtype: torch.dtype) -> str:
    """The :attr:`DeviceProfile.peak_flops` key of GEMMs with ``dtype`` operands."""
    return _DTYPE_KEYS[dtype]


# Link bandwidth each way per device, GB/s (datasheet): NVLink 4 (900 GB/s both ways) on H100/H200/GH200 SXM, NVLink 5
# on B200, NVLink 3 on A100 SXM; PCIe Gen5 x16 on the H100 PCIe, Gen4 x16 on the L40S and A10G (no NVLink)
_LINK_GBS = {
    "h100-sxm": 450, "h100-pcie": 64, "h200": 450, "gh200": 450, "b200": 900, "a100-80gb": 300, "a100-40gb": 300,
    "l40s": 32, "a10g": 32,
}  # fmt: skip


def _gpu(name, description, bf16, fp32, tf32, bandwidth_gbs, memory_gb, sms, clock_ghz, fp64=None) -> DeviceProfile:
    flops = {"bf16": bf16 * TERA, "fp16": bf16 * TERA, "fp32": fp32 * TERA, "tf32": tf32 * TERA}
    flops["fp64"] = (fp64 if fp64 is not None else fp32 / 2) * TERA
    return DeviceProfile(
        name, description, flops, bandwidth_gbs * GB, memory_gb * GB, sms, clock_ghz * 1e9,
        link_bandwidth=_LINK_GBS.get(name, 32) * GB,
    )  # fmt: skip


# Datasheet figures, dense (no 2:4 sparsity). fp32 is the non-tensor-core rate.
PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        _gpu("h100-sxm", "NVIDIA H100 SXM5 80 GB (HBM3)", 989.4, 66.9, 494.7, 3350, 80, 132, 1.98, fp64=66.9),
        _gpu("h100-pcie", "NVIDIA H100 PCIe 80 GB (HBM2e)", 756.5, 51.2, 378.0, 2000, 80, 114, 1.755, fp64=51.2),
        _gpu("h200", "NVIDIA H200 SXM 141 GB (HBM3e)", 989.4, 66.9, 494.7, 4800, 141, 132, 1.98, fp64=66.9),
        _gpu("gh200", "NVIDIA GH200 96 GB (HBM3)", 989.4, 66.9, 494.7, 4000, 96, 132, 1.98, fp64=66.9),
        _gpu("b200", "NVIDIA B200 180 GB (HBM3e)", 2250.0, 80.0, 1100.0, 8000, 180, 148, 1.965, fp64=40.0),
        _gpu("a100-80gb", "NVIDIA A100 SXM4 80 GB (HBM2e)", 312.0, 19.5, 156.0, 2039, 80, 108, 1.41, fp64=9.7),
        _gpu("a100-40gb", "NVIDIA A100 40 GB (HBM2)", 312.0, 19.5, 156.0, 1555, 40, 108, 1.41, fp64=9.7),
        _gpu("l40s", "NVIDIA L40S 48 GB (GDDR6)", 362.05, 91.6, 183.0, 864, 48, 142, 2.52, fp64=1.4),
        # The A10 datasheet's figures; the A10G (AWS) runs at slightly different clocks
        _gpu("a10g", "NVIDIA A10G 24 GB (GDDR6)", 125.0, 31.2, 62.5, 600, 24, 80, 1.71, fp64=1.0),
    )
}

# Anything else with CUDA: figures below every data-center GPU above, so plans err towards smaller chunks' costs
# being underestimated less than GEMM time; memory comes from the device itself.
UNKNOWN_GPU = _gpu("unknown-gpu", "unknown GPU (conservative default)", 100.0, 20.0, 50.0, 800, 16, 64, 1.5)

# The development machines: only used to plan chunk sizes on CPU, where the workspace budget, not speed, decides.
CPU = DeviceProfile(
    "cpu",
    "CPU (nominal figures; on CPU the budget, not the model, decides the chunks)",
    {"bf16": 0.2 * TERA, "fp16": 0.2 * TERA, "fp32": 0.2 * TERA, "tf32": 0.2 * TERA, "fp64": 0.1 * TERA},
    20 * GB,
    64 * GB,
    1,
    3e9,
    gemm_efficiency=1.0,
    bandwidth_efficiency=1.0,
    small_kernel_us=10.0,
    exp_per_clock_per_sm=4,
    host_read_us=0.0,  # the CPU runs kernels as it launches them: no idle device to model
    host_launch_us=0.0,
    is_gpu=False,
    link_bandwidth=5 * GB,  # gloo between processes of one machine: nominal
    link_latency_us=50.0,
)

ALIASES = {"h100": "h100-sxm", "a100": "a100-80gb", "cpu": "cpu"}

# Substrings of torch.cuda.get_device_name(), most specific first ("GH200" before "H200", PCIe before SXM)
_NAME_MATCHES = (
    ("GH200", "gh200"),
    ("H200", "h200"),
    ("H100 PCIe", "h100-pcie"),
    ("H100", "h100-sxm"),
    ("B200", "b200"),
    ("A100-SXM4-40GB", "a100-40gb"),
    ("A100-PCIE-40GB", "a100-40gb"),
    ("A100", "a100-80gb"),
    ("L40S", "l40s"),
    ("A10G", "a10g"),
)


def profile_names() -> tuple[str, ...]:
    return (*PROFILES, "cpu", *ALIASES, "cuda")


def get_profile(device: str | torch.device | DeviceProfile) -> DeviceProfile:
    """A profile by name (``"h100"``, ``"b200"``, ``"cpu"``, ...), ``"cuda"`` for the current GPU, or for a
    ``torch.device``. Unknown names raise ``ValueError`` listing the known ones."""
    if isinstance(device, DeviceProfile):
        return device
    if isinstance(device, torch.device):
        return profile_for_device(device)
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a profile name, a torch.device or a DeviceProfile, got {type(device).__name__}"
        )
    key = device.lower()
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA device here; name a profile instead ({_known()})")
        return profile_for_device(torch.device(key))
    key = ALIASES.get(key, key)
    if key == "cpu":
        return CPU
    if key not in PROFILES:
        raise ValueError(f"unknown device profile {device!r}; known: {_known()}")
    return PROFILES[key]


def _known() -> str:
    return ", ".join(sorted(set(PROFILES) | set(ALIASES) | {"cuda"}))


def profile_from_name(device_name: str) -> DeviceProfile | None:
    """The profile whose marker appears in a CUDA device name, or None."""
    for marker, key in _NAME_MATCHES:
        if marker.lower() in device_name.lower():
            return PROFILES[key]
    return None


def profile_for_device(device: torch.device) -> DeviceProfile:
    """The profile of ``device``: the table's entry for a known GPU, :data:`UNKNOWN_GPU` with the device's memory
    otherwise, :data:`CPU` for anything that is not CUDA."""
    if device.type != "cuda":
        return CPU
    name = torch.cuda.get_device_name(device)
    profile = profile_from_name(name)
    if profile is not None:
        return profile
    memory = torch.cuda.get_device_properties(device).total_memory
    return dataclasses.replace(UNKNOWN_GPU, description=f"{name} (not in the table: conservative default)").with_memory(
        memory
    )
