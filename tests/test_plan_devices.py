"""Device profiles: the table, lookup by name and by CUDA device name, the conservative default."""

import pytest
import torch

from fused_gspo.plan import devices


# every GPU in the table
@pytest.mark.parametrize("name", sorted(devices.PROFILES))
def test_every_profile_is_complete_and_plausible(name):
    p = devices.PROFILES[name]
    assert p.name == name and p.is_gpu
    # tensor cores beat plain FP32 and TF32 sits between; bf16 and fp16 run at the same rate
    assert p.peak_flops["bf16"] == p.peak_flops["fp16"] > p.peak_flops["tf32"] > 0
    assert p.peak_flops["fp32"] > 0 and p.peak_flops["fp64"] > 0
    assert 500e9 <= p.bandwidth <= 10e12 and 16e9 <= p.memory_bytes <= 200e9
    assert 0 < p.gemm_efficiency <= 1 and 0 < p.bandwidth_efficiency <= 1
    assert 1e12 < p.exp_rate < 1e14  # SM count x 16 exp/clock x ~1.5-2.5 GHz


def test_h100_figures_are_the_issue_s():
    """~750 TFLOP/s of bf16 GEMM in practice and ~3 TB/s of HBM: the figures the chunk plan was reasoned with."""
    h100 = devices.get_profile("h100")
    assert 700e12 < h100.gemm_flops("bf16") < 800e12
    assert 2.9e12 < h100.stream_bandwidth < 3.1e12


# Names as torch.cuda.get_device_name() prints them; GH200 must not be taken for an H200, nor PCIe for SXM
@pytest.mark.parametrize(
    "device_name,profile",
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA B200", "b200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA A10G", "a10g"),
    ],
)
def test_device_names_find_their_profile(device_name, profile):
    assert devices.profile_from_name(device_name).name == profile


def test_unknown_gpu_gets_none_from_the_table():
    assert devices.profile_from_name("NVIDIA GeForce RTX 4090") is None
    assert devices.UNKNOWN_GPU.peak_flops["bf16"] < min(p.peak_flops["bf16"] for p in devices.PROFILES.values())


def test_lookup_by_name_alias_and_device():
    assert devices.get_profile("h100") is devices.PROFILES["h100-sxm"]
    assert devices.get_profile("A100") is devices.PROFILES["a100-80gb"]
    assert devices.get_profile("cpu") is devices.CPU and not devices.CPU.is_gpu
    assert devices.get_profile(torch.device("cpu")) is devices.CPU
    assert devices.get_profile(devices.PROFILES["b200"]) is devices.PROFILES["b200"]
    for name in devices.profile_names():
        if name != "cuda" or torch.cuda.is_available():
            assert devices.get_profile(name).name


def test_bad_names_are_refused_with_the_list():
    with pytest.raises(ValueError, match="known: .*h100"):
        devices.get_profile("tpu-v5")
    with pytest.raises(TypeError, match="device"):
        devices.get_profile(3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            devices.get_profile("cuda")
