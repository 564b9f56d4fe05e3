"""cpu.py: what this CPU does fast, as the engine reads it. The features against Linux's own list
and oneDNN's own report of the instructions it uses; the decisions made from them on made-up CPUs
(a test cannot choose the machine it runs on); and the oneDNN instruction-set cap, with which one
machine can be made to compute as an older CPU does (README, "Speed")."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

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


def test_float16_weight_matmuls_are_offered_where_this_pytorch_has_fbgemm():
    # FBGEMM comes with PyTorch's x86 builds; its float16-weight matmul needs only AVX2's F16C and FMA.
    assert cpu_features().fp16_weight_matmul == ("fbgemm" in torch.backends.quantized.supported_engines)
    if cpu_features().fp16_weight_matmul:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.eye(4), None)
        assert torch.equal(torch.ops.quantized.linear_dynamic_fp16(torch.eye(4), packed), torch.eye(4))


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
    for fp16_weight_matmul in (True, False):  # FBGEMM's kernels are not oneDNN's: no cap reaches them
        with_fbgemm = dataclasses.replace(features, fp16_weight_matmul=fp16_weight_matmul)
        assert capped_features(with_fbgemm, flags, cap).fp16_weight_matmul == fp16_weight_matmul
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
    from bf16_layers import prepacking_helps
    from quantize import linear_storage
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
    # No native bf16 under the cap: bf16 weights held in float16 for FBGEMM where this PyTorch has it
    # (x86), else widened for prompts.
    assert ours[3] == ("half" if "fbgemm" in torch.backends.quantized.supported_engines else "widened")
    assert ours[4] == str("AVX-512" in onednn_isa), onednn_isa


# --------------------------------------------------------------------------------------------
# Threads: the CPUs this process may run on, and the CPU time its control group may use
# --------------------------------------------------------------------------------------------


def fake_cgroups(monkeypatch, tmp_path, membership: str, mounts: list[tuple[str, str, str, str]],
                 limits: dict[str, dict[str, str]]) -> None:
    """A made-up /proc/self/cgroup (`membership`), /proc/self/mountinfo (`mounts`: ROOT, MOUNT_POINT
    under tmp_path, FSTYPE, SUPER_OPTIONS) and control group files (`limits`: directory under
    tmp_path -> file name -> contents), for `cpu.cpu_quota` to read."""
    lines = [f"{30 + i} 23 0:{40 + i} {root} {tmp_path / point} rw,nosuid,nodev,noexec,relatime shared:{i} - "
             f"{fstype} {fstype} {options}" for i, (root, point, fstype, options) in enumerate(mounts)]
    (tmp_path / "mountinfo").write_text("\n".join(lines) + "\n")
    (tmp_path / "cgroup").write_text(membership)
    for directory, files in limits.items():
        (tmp_path / directory).mkdir(parents=True, exist_ok=True)
        for name, contents in files.items():
            (tmp_path / directory / name).write_text(contents)
    monkeypatch.setattr(cpu, "CGROUP_MEMBERSHIP", tmp_path / "cgroup")
    monkeypatch.setattr(cpu, "MOUNTINFO", tmp_path / "mountinfo")


V2_MOUNT = ("/", "sys/fs/cgroup", "cgroup2", "rw,nsdelegate,memory_recursiveprot")


@pytest.mark.parametrize("cpu_max, quota", [("150000 100000\n", 1.5), ("max 100000\n", None), ("50000 100000\n", 0.5)])
def test_a_cgroup_v2_quota_is_read_in_cpus(monkeypatch, tmp_path, cpu_max, quota):
    # Docker or Kubernetes with cgroup v2 and a cgroup namespace: the container's group is the root it sees.
    fake_cgroups(monkeypatch, tmp_path, "0::/\n", [V2_MOUNT], {"sys/fs/cgroup": {"cpu.max": cpu_max}})
    assert cpu.cpu_quota() == quota


def test_a_parents_quota_caps_its_childs(monkeypatch, tmp_path):
    # systemd: a service with no limit of its own inside a slice limited to 2 CPUs.
    fake_cgroups(monkeypatch, tmp_path, "0::/user.slice/app.service\n", [V2_MOUNT], {
        "sys/fs/cgroup/user.slice": {"cpu.max": "200000 100000\n"},
        "sys/fs/cgroup/user.slice/app.service": {"cpu.max": "max 100000\n"},
    })
    assert cpu.cpu_quota() == 2.0


def test_a_cgroup_v1_quota_is_read_where_docker_mounts_the_containers_own_group(monkeypatch, tmp_path):
    # Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path, and the
    # mount's ROOT is that same path, so the container's group is the mount point itself.
    container = "/docker/4f08548fa00f0a406b52de3c4d59dab6"
    membership = f"12:memory:{container}\n4:cpu,cpuacct:{container}\n0::/\n"
    mounts = [(container, "sys/fs/cgroup/memory", "cgroup", "rw,memory"),
              (container, "sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")]
    fake_cgroups(monkeypatch, tmp_path, membership, mounts, {
        "sys/fs/cgroup/cpu,cpuacct": {"cpu.cfs_quota_us": "50000\n", "cpu.cfs_period_us": "100000\n"},
        "sys/fs/cgroup/memory": {"cpu.cfs_quota_us": "10000\n", "cpu.cfs_period_us": "100000\n"},  # not the CPU's
    })
    assert cpu.cpu_quota() == 0.5


@pytest.mark.parametrize("limits", [
    {"sys/fs/cgroup/cpu": {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"}},  # v1: no quota
    {"sys/fs/cgroup/cpu": {}},  # no CPU controller files at all
    {"sys/fs/cgroup/cpu": {"cpu.cfs_quota_us": "lots\n", "cpu.cfs_period_us": "100000\n"}},  # not as documented
])
def test_no_readable_quota_means_none(monkeypatch, tmp_path, limits):
    fake_cgroups(monkeypatch, tmp_path, "4:cpu:/\n", [("/", "sys/fs/cgroup/cpu", "cgroup", "rw,cpu")], limits)
    assert cpu.cpu_quota() is None


def test_without_linuxs_cgroup_files_there_is_no_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "CGROUP_MEMBERSHIP", tmp_path / "no such file")
    assert cpu.cpu_quota() is None


@pytest.mark.parametrize("cpus, quota, threads", [
    (8, None, 8),  # no quota: every CPU this process may run on
    (8, 2.0, 2),  # docker run --cpus=2 on an 8-core machine
    (8, 1.5, 1),  # only whole CPUs: a second thread would be paused a third of the time
    (8, 0.5, 1),  # at least one
    (2, 4.0, 2),  # a quota above the CPUs changes nothing
])
def test_default_threads_are_the_cpus_this_process_may_run_on_within_its_quota(monkeypatch, cpus, quota, threads):
    monkeypatch.setattr(cpu, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(cpu, "cpu_quota", lambda: quota)
    assert cpu.choose_threads(None) == threads
    assert cpu.choose_threads(cpus) == cpus  # asked for, more threads than the quota are allowed


# Joins the control group given as argv[1] (writing its pid to cgroup.procs), then prints what cpu.py reads.
JOIN_AND_READ = textwrap.dedent("""
    import os, sys
    try:
        with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    except OSError as error:
        print("cannot join", error)
        sys.exit(0)
    import cpu
    print("quota", cpu.cpu_quota(), "threads", cpu.choose_threads(None), "cpus", cpu.usable_cpus())
""")


def make_group_with_quota(groups: list[Path], quota: str, period: str) -> Optional[Path]:
    """A new control group under the first of `groups` that takes one and has a CPU controller, with
    that quota (cgroup v2's cpu.max, or v1's two files); None where this machine allows none."""
    for group in groups:
        made = group / f"llama-from-scratch-test-{os.getpid()}"
        try:
            made.mkdir()
        except OSError:  # not root, or a read-only hierarchy
            continue
        try:
            if (made / "cpu.max").exists():
                (made / "cpu.max").write_text(f"{quota} {period}")
                return made
            if (made / "cpu.cfs_quota_us").exists():
                (made / "cpu.cfs_period_us").write_text(period)
                (made / "cpu.cfs_quota_us").write_text(quota)
                return made
        except OSError:
            pass
        made.rmdir()  # no CPU controller here, or the quota was refused
    return None


def test_a_real_control_groups_quota_is_read_by_a_process_inside_it():
    """The kernel's own files, where this machine lets a test make a control group (root, a writable
    CPU hierarchy): a process in a group with a quota of 1.5 CPUs computes with 1 thread."""
    try:
        groups = cpu.cgroup_dirs(cpu.CGROUP_MEMBERSHIP.read_text(), cpu.MOUNTINFO.read_text())
    except OSError:
        pytest.skip("no /proc/self/cgroup: not Linux")
    made = make_group_with_quota(groups, quota="150000", period="100000")
    if made is None:
        pytest.skip("this machine lets no test make a control group with a CPU quota")
    try:
        result = subprocess.run([sys.executable, "-c", JOIN_AND_READ, str(made)], capture_output=True, text=True,
                                cwd=ROOT, timeout=120)
    finally:
        made.rmdir()  # empty again: the process has ended
    assert result.returncode == 0, result.stderr
    if result.stdout.startswith("cannot join"):
        pytest.skip(f"a process cannot join the control group made here: {result.stdout.strip()}")
    _, quota, _, threads, _, cpus = result.stdout.split()
    assert float(quota) == 1.5
    assert int(threads) == 1  # the whole CPUs of the quota, however many CPUs it may run on
