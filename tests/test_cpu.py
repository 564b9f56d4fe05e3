"""cpu.py: what this CPU does fast, as the engine reads it. The features against Linux's own list
and oneDNN's own report of the instructions it uses; the decisions made from them on made-up CPUs
(a test cannot choose the machine it runs on); and the oneDNN instruction-set cap, with which one
machine can be made to compute as an older CPU does (README, "Speed")."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cpu
from cpu import ONEDNN_CAP_KEEPS, CpuFeatures, capped_features, cpu_features, float_matmul_dtype, onednn_isa_cap

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("device, dtype, native_bf16, expected", [
    ("cpu", torch.bfloat16, True, torch.bfloat16),
    ("cpu", torch.bfloat16, False, torch.float32),  # emulated bf16 is slower than float32
    ("cpu", torch.float32, False, torch.float32),
    ("cuda", torch.float16, False, torch.float16),
])
def test_a_prompts_float_matmul_runs_in_bf16_only_where_the_cpu_has_it(device, dtype, native_bf16, expected):
    features = CpuFeatures(name="made up", native_bf16=native_bf16, int8_dot=True)
    assert float_matmul_dtype(dtype, torch.device(device), features) == expected


def test_cpu_features_are_read_from_this_machine_consistently_with_linux():
    if onednn_isa_cap() is not None:
        pytest.skip("oneDNN is capped here: see test_under_a_onednn_isa_cap_our_features_agree_with_the_isa_onednn_reports")
    features = cpu_features()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512_vnni" in flags or " amx_int8" in flags:
        assert features.int8_dot
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        assert features.native_bf16
    assert torch.backends.cpu.get_cpu_capability() in features.name


# /proc/cpuinfo's "Features" line of two arm64 CPUs: AWS Graviton3 (Neoverse V1: BF16) and Graviton2
# (Neoverse N1: none). "svebf16" is SVE's bf16, a different flag from "bf16".
GRAVITON3_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
                      "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg "
                      "dcpodp svei8mm svebf16 i8mm bf16 dgh rng")
GRAVITON2_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"


@pytest.mark.parametrize("features_line, native_bf16", [
    pytest.param(GRAVITON3_FEATURES, True, id="graviton3"),
    pytest.param(GRAVITON2_FEATURES, False, id="graviton2"),
])
def test_an_arm64_cpus_bf16_is_read_from_linux_features_line(features_line, native_bf16, tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: {features_line}\nCPU implementer\t: 0x41\n")
    monkeypatch.setattr(cpu, "CPUINFO", cpuinfo)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_vnni_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)  # PyTorch's x86 probes, as they answer on arm64
    for variable in cpu.ONEDNN_ISA_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    features = cpu.cpu_features.__wrapped__()  # read afresh, not this machine's cached answer
    assert features.native_bf16 == native_bf16
    assert features.name.endswith("(bf16)") == native_bf16  # the flag is shown, and "svebf16" is not it
    assert not features.int8_dot  # arm64's dot products are not counted: w8a8 is unmeasured there


ZEN4_CPU = CpuFeatures(name="x86_64: AVX512 (avx512_vnni avx512_bf16)", native_bf16=True, int8_dot=True)
ZEN4_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
ALDER_LAKE_CPU = CpuFeatures(name="x86_64: AVX2 (avx_vnni)", native_bf16=False, int8_dot=True)
ALDER_LAKE_FLAGS = {"avx2", "avx_vnni"}


@pytest.mark.parametrize("features, flags, cap, native_bf16, int8_dot", [
    (ZEN4_CPU, ZEN4_FLAGS, None, True, True),
    (ZEN4_CPU, ZEN4_FLAGS, "AVX512_CORE_BF16", True, True),
    (ZEN4_CPU, ZEN4_FLAGS, "ALL", True, True),
    (ZEN4_CPU, ZEN4_FLAGS, "NO_SUCH_ISA", True, True),  # oneDNN ignores a name it does not know
    (ZEN4_CPU, ZEN4_FLAGS, "AVX512_CORE_VNNI", False, True),  # Ice Lake's instructions: bf16 emulated, VNNI kept
    (ZEN4_CPU, ZEN4_FLAGS, "AVX2_VNNI", False, False),  # AVX-VNNI is not AVX-512 VNNI: plain AVX2 here
    (ZEN4_CPU, ZEN4_FLAGS, "AVX512_CORE", False, False),
    (ZEN4_CPU, ZEN4_FLAGS, "AVX2", False, False),
    (ALDER_LAKE_CPU, ALDER_LAKE_FLAGS, "AVX2_VNNI", False, True),
    (ALDER_LAKE_CPU, ALDER_LAKE_FLAGS, "AVX512_CORE_VNNI", False, False),  # no AVX-512 to keep
])
def test_a_onednn_isa_cap_keeps_only_the_instructions_inside_it(features, flags, cap, native_bf16, int8_dot):
    capped = capped_features(features, flags, cap)
    assert (capped.native_bf16, capped.int8_dot) == (native_bf16, int8_dot)
    assert (f"oneDNN capped at {cap}" in capped.name) == (cap in ONEDNN_CAP_KEEPS)
    if cap == "AVX2":
        assert capped.name.endswith("oneDNN capped at AVX2 (keeps none of them)")  # the flags listed before it


def test_the_onednn_isa_cap_is_read_from_the_environment_as_onednn_reads_it():
    assert onednn_isa_cap({}) is None
    assert onednn_isa_cap({"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"}) == "AVX512_CORE_VNNI"
    assert onednn_isa_cap({"DNNL_MAX_CPU_ISA": "AVX2"}) == "AVX2"  # the older name
    assert onednn_isa_cap({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "DNNL_MAX_CPU_ISA": "AVX2"}) == "AVX512_CORE"


# Runs a bf16 and an int8 matmul with oneDNN's verbose log on, then prints what `cpu_features` says, how bf16
# layers are stored, and whether they could be packed for oneDNN (PyTorch hands it bf16 only with AVX-512).
ONEDNN_ISA_REPORT = textwrap.dedent("""
    import torch
    from cpu import cpu_features
    from quantize import linear_storage, prepacking_helps
    torch.nn.functional.linear(torch.ones(64, 576, dtype=torch.bfloat16), torch.ones(1536, 576, dtype=torch.bfloat16))
    torch._int_mm(torch.ones(64, 576, dtype=torch.int8), torch.ones(576, 1536, dtype=torch.int8))  # oneDNN under any cap
    features = cpu_features()
    print("ours", features.native_bf16, features.int8_dot, linear_storage("cpu", torch.bfloat16),
          prepacking_helps(torch.device("cpu"), torch.bfloat16))
""")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"),
                    reason="oneDNN's AVX-512 caps need an AVX-512 CPU")
@pytest.mark.parametrize("cap", ["AVX512_CORE_VNNI", "AVX512_CORE", "AVX2_VNNI", "AVX2"])
def test_under_a_onednn_isa_cap_our_features_agree_with_the_isa_onednn_reports(cap):
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap, "ONEDNN_VERBOSE": "1"}
    result = subprocess.run([sys.executable, "-c", ONEDNN_ISA_REPORT], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    isa_lines = [line for line in result.stdout.splitlines() if ",isa:" in line]
    if not isa_lines:
        pytest.skip("this PyTorch's oneDNN printed no ISA line")
    onednn_isa = isa_lines[0]  # e.g. "onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel DL Boost"
    ours = next(line for line in result.stdout.splitlines() if line.startswith("ours")).split()
    assert ours[1] == str("bfloat16" in onednn_isa), onednn_isa
    assert ours[2] == str("DL Boost" in onednn_isa), onednn_isa
    assert ours[3] == "widened"  # no native bf16 under the cap: bf16 layers multiply prompts in float32
    assert ours[4] == str("AVX-512" in onednn_isa), onednn_isa
