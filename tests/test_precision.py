"""precision = "auto" is decided by the hardware; explicit choices are kept."""
import warnings

import pytest

from sae_engine.training.precision import resolve_precision
from sae_kernels.hardware import CpuInfo, cpu_info, parse_cpuinfo

ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx fma avx2 bmi2\n"
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512bw avx512_bf16 avx512vl\n"
SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Platinum 8481C\n"
                   "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: avx2 avx512f avx512bw\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\nCPU implementer\t: 0x41\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes atomics\n"


@pytest.mark.parametrize("text, native, expected", [
    (ZEN3, False, "fp32"), (ZEN4, True, "bf16"), (SAPPHIRE_RAPIDS, True, "bf16"),
    (SKYLAKE, False, "fp32"), (GRAVITON3, True, "bf16"), (GRAVITON2, False, "fp32"),
])
def test_auto_on_cpus_follows_bf16_units(text, native, expected):
    cpu = parse_cpuinfo(text)
    assert cpu.native_bf16 is native
    chosen = resolve_precision("auto", "cpu", cpu=cpu)
    assert chosen.dtype == expected
    assert ("has bf16 matrix units" in chosen.reason) is native


def test_cpu_description_names_model_and_features():
    assert parse_cpuinfo(ZEN4).describe() == "AMD EPYC 9B14 (AVX2, AVX-512, AVX-512-BF16)"
    assert parse_cpuinfo(ZEN3).describe() == "AMD EPYC 7B13 (AVX2)"
    assert parse_cpuinfo(SAPPHIRE_RAPIDS).features == ["AVX2", "AVX-512", "AVX-512-BF16", "AMX-BF16"]


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                                  ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_follows_compute_capability(capability, expected):
    for device in ("cuda", "gpu"):
        assert resolve_precision("auto", device, cuda_capability=capability).dtype == expected


def test_explicit_choice_is_kept_with_a_warning_when_emulated():
    zen3 = parse_cpuinfo(ZEN3)
    with pytest.warns(UserWarning, match="emulated"):
        assert resolve_precision("bf16", "cpu", cpu=zen3).dtype == "bf16"
    with pytest.warns(UserWarning, match="emulated"):
        assert resolve_precision("bf16", "cuda", cuda_capability=(7, 5)).dtype == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("fp32", "cpu", cpu=parse_cpuinfo(ZEN4)).dtype == "fp32"
        assert resolve_precision("bf16", "cpu", cpu=parse_cpuinfo(ZEN4)).dtype == "bf16"


def test_unknown_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_precision("fp8", "cpu", cpu=CpuInfo("x", frozenset()))


def test_this_machine_is_read():
    cpu = cpu_info()
    assert cpu.model
    assert resolve_precision("auto", "cpu").dtype == ("bf16" if cpu.native_bf16 else "fp32")
