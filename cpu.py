"""What this CPU does fast: the facts the engine's choices are made from.

A small model's speed on a CPU depends less on the model than on which instructions the CPU has:

* **native bf16** (AVX-512 BF16, AMX): a bf16 matmul runs in hardware. Without it oneDNN, the
  kernel library behind PyTorch's CPU matmuls, widens bf16 to float32 and multiplies in float32,
  so a bf16 matmul of many rows is *slower* than a float32 one (measured 2-2.5x at 512 rows with
  an Ice Lake's instruction set), while one of a few rows, which waits on memory, still gains from
  bf16's half-size weights. `float_matmul_dtype` says which dtype a matmul of many rows should run
  in: quantized layers multiply prompts in it, and bf16 layers (bf16_layers.WidenedLinear) in float32
  wherever bf16 is emulated.
* **FBGEMM's float16-weight matmul** (PyTorch's x86 builds): where bf16 is emulated, bf16 weights
  are held in float16 for it (bf16_layers.HalfLinear), which widens them in registers and reads
  bf16's bytes for any number of rows. FBGEMM chooses its own kernels; oneDNN's cap does not reach it.
* **int8 dot products** (AVX-512 VNNI, AVX-VNNI, AMX): four 8-bit multiply-adds into one 32-bit sum
  per lane and instruction. This is what makes w8a8's integer matmul (`torch._int_mm`) fast, and
  `--quantize w8a8` is refused without it. (arm64's dot products are not counted: how fast
  `torch._int_mm` runs there is not measured, so w8a8 is not offered on arm64.)
* **how many CPUs this process may use** (`usable_cpus`, `cpu_quota`): the default number of
  threads. Every decode step of a small model crosses hundreds of thread barriers, so threads on
  CPUs that are busy with other work cost far more than they bring (README, "Threads on a busy
  machine"). Two limits count: the CPUs the process may run on (its affinity: `taskset`, a
  container's cpuset), and the CPU time it may use (its control group's quota: Docker's `--cpus`,
  a Kubernetes CPU limit, systemd's `CPUQuota`). A quota of q CPUs lets all threads together run
  q seconds per second; a thread beyond floor(q) gets paused mid-step while the others wait for
  it at the next barrier.

The features are read once, from PyTorch's own probe and Linux's /proc/cpuinfo, *as far as oneDNN
may use them*: an environment variable (ONEDNN_MAX_CPU_ISA) caps oneDNN's instruction set, and the
engine then chooses as it would on a CPU that has only those (`capped_features`). Tests pass
made-up `CpuFeatures` to check every decision for CPUs they do not run on.
"""

import functools
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch


CPUINFO = Path("/proc/cpuinfo")
# Where Linux says which control groups this process is in, and where their file systems are mounted.
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
# x86 flags (Linux's names) of int8 dot-product instructions: what makes w8a8's integer matmul fast.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# ... and of bf16 arithmetic: without one, oneDNN emulates bf16 matmuls with float32 ones. "bf16" is
# arm64's name (Armv8.6's BF16: AWS Graviton3 and later, Neoverse V1, V2, N2): PyTorch hands bf16
# matmuls to oneDNN (with Arm's Compute Library) only on an arm64 CPU that has it.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# oneDNN (the kernel library behind PyTorch's CPU matmuls) uses no instruction outside the set named
# in ONEDNN_MAX_CPU_ISA (older name: DNNL_MAX_CPU_ISA), whatever the CPU has. AVX512_CORE_VNNI is
# Ice Lake's set: a CPU with AVX-512 BF16 then multiplies as an Ice Lake does (README, "Speed").
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# Which of the flags above each cap keeps. The sets are not a ladder: AVX2_VNNI's avx_vnni is not
# part of AVX512_CORE_VNNI, so a Zen 4 capped at AVX2_VNNI (it has avx512_vnni, not avx_vnni) falls
# back to plain AVX2. Caps not listed (ALL, the AMX ones, names oneDNN does not know) take nothing away.
ONEDNN_CAP_KEEPS = {
    "SSE41": (), "AVX": (), "AVX2": (), "AVX512_CORE": (),
    "AVX2_VNNI": ("avx_vnni",), "AVX2_VNNI_2": ("avx_vnni",),
    "AVX512_CORE_VNNI": ("avx512_vnni",),
    "AVX512_CORE_BF16": ("avx512_vnni", "avx512_bf16"),
    "AVX512_CORE_FP16": ("avx512_vnni", "avx512_bf16"), "AVX10_1_512": ("avx512_vnni", "avx512_bf16"),
}


@dataclass(frozen=True)
class CpuFeatures:
    """The instructions that decide which kernels are fast here. Read once by `cpu_features`;
    tests pass made-up ones to check the decisions for CPUs they do not run on."""

    name: str  # e.g. "x86_64: AVX512 (avx512_vnni amx_int8)", for the "loaded ..." line and bench
    native_bf16: bool  # bf16 matmuls in hardware (AVX-512 BF16, AMX); else emulated: prompts 2-2.5x slower than fp32
    int8_dot: bool  # int8 dot products in hardware (AVX-512 VNNI, AVX-VNNI, AMX): w8a8 runs
    # FBGEMM's matmul of float32 rows by float16 weights (x86 builds of PyTorch, AVX2 and up): where
    # bf16 is emulated, bf16 weights are held in float16 for it (bf16_layers.HalfLinear)
    fp16_weight_matmul: bool = False


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them ("avx512_vnni", ...); empty elsewhere."""
    if not CPUINFO.is_file():
        return set()
    for line in CPUINFO.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):  # x86 / arm64
            return set(line.partition(":")[2].split())
    return set()


def onednn_isa_cap(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The instruction set oneDNN is capped at by the environment (e.g. "AVX512_CORE_VNNI"); None if not capped."""
    for variable in ONEDNN_ISA_VARIABLES:  # the first one set wins, as in oneDNN
        if environ.get(variable):
            return environ[variable].strip().upper()
    return None


def capped_features(features: CpuFeatures, flags: set[str], cap: Optional[str]) -> CpuFeatures:
    """What oneDNN will do on a CPU with `features` and Linux `flags` when capped at the instruction
    set `cap`: only the flags the cap keeps count (ONEDNN_CAP_KEEPS). Without flags (not Linux), a
    cap that takes anything away leaves neither native bf16 nor int8 dot products."""
    if cap not in ONEDNN_CAP_KEEPS:
        return features
    kept = flags & set(ONEDNN_CAP_KEEPS[cap])
    return CpuFeatures(
        name=f"{features.name}, oneDNN capped at {cap} (keeps {' '.join(sorted(kept)) or 'none of them'})",
        native_bf16=features.native_bf16 and any(flag in kept for flag in NATIVE_BF16_FLAGS),
        int8_dot=features.int8_dot and any(flag in kept for flag in INT8_DOT_FLAGS),
        fp16_weight_matmul=features.fp16_weight_matmul,  # FBGEMM's own kernels: oneDNN's cap does not reach them
    )


@functools.cache
def cpu_features() -> CpuFeatures:
    """This CPU's features, from PyTorch's own CPU probe (cpuinfo) and, on Linux, /proc/cpuinfo, as
    far as oneDNN may use them (`onednn_isa_cap`). Read once per process (a build asks several
    times: dtype, storage, the "loaded ..." line), as oneDNN reads its cap once."""
    flags = cpu_flags()
    amx = torch.cpu._is_amx_tile_supported()
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or amx or any(f in flags for f in NATIVE_BF16_FLAGS)
    int8_dot = torch.cpu._is_vnni_supported() or amx or any(f in flags for f in INT8_DOT_FLAGS)
    shown = " ".join(f for f in (*INT8_DOT_FLAGS, *NATIVE_BF16_FLAGS) if f in flags)
    name = f"{platform.machine()}: {torch.backends.cpu.get_cpu_capability()}" + (f" ({shown})" if shown else "")
    features = CpuFeatures(name=name, native_bf16=native_bf16, int8_dot=int8_dot,
                           fp16_weight_matmul=has_fp16_weight_matmul())
    return capped_features(features, flags, onednn_isa_cap())


def has_fp16_weight_matmul() -> bool:
    """Whether this PyTorch has FBGEMM (x86 builds), whose matmul multiplies float32 rows by a float16
    weight it has packed, widening each weight in registers (`torch.ops.quantized.linear_dynamic_fp16`).
    FBGEMM picks its own kernels (AVX2 or AVX-512 FMA: every x86 CPU PyTorch runs on has them)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def float_matmul_dtype(dtype: torch.dtype, device: torch.device, features: Optional[CpuFeatures] = None) -> torch.dtype:
    """The dtype a float matmul for activations in `dtype` runs fastest in: `dtype` itself, except
    bfloat16 on a CPU without native bf16, where float32 is faster (oneDNN emulates bf16 with it)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return dtype
    features = features if features is not None else cpu_features()
    return dtype if features.native_bf16 else torch.float32


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cgroup_dirs(membership: str, mountinfo: str) -> list[Path]:
    """The directories of this process's CPU control groups, each with its ancestors up to the mount.

    `membership` is /proc/self/cgroup: "ID:CONTROLLERS:PATH" lines, "0::PATH" for cgroup v2 (one
    hierarchy for every controller) and e.g. "4:cpu,cpuacct:PATH" for v1's CPU hierarchy.
    `mountinfo` is /proc/self/mountinfo: "ID PARENT DEV ROOT MOUNT_POINT OPTIONS ... - FSTYPE SOURCE
    SUPER_OPTIONS" lines; a container may see its hierarchy mounted from a ROOT below the top, and
    then PATH begins with that ROOT.
    """
    paths = {}  # "cgroup2" or "cgroup" -> this process's path in that hierarchy
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            paths["cgroup2"] = path
        elif "cpu" in controllers.split(","):
            paths["cgroup"] = path
    dirs = []
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in paths:
            continue
        if tail[0] == "cgroup" and "cpu" not in tail[2].split(","):  # a v1 hierarchy of other controllers
            continue
        mount_root, mount_point, path = Path(fields[3]), Path(fields[4]), Path(paths[tail[0]])
        # The process's group, as a directory under the mount point; a path outside the mounted
        # part of the hierarchy (not seen in practice) leaves only the mount point's own limits.
        here = mount_point / path.relative_to(mount_root) if path.is_relative_to(mount_root) else mount_point
        dirs.append(here)
        while here != mount_point:  # up to the mount point: a parent's quota caps its children's
            here = here.parent
            dirs.append(here)
    return dirs


def quota_in(directory: Path) -> Optional[float]:
    """The CPU quota set in one control group directory, in CPUs (1.5: one and a half CPUs' time per
    second); None if it sets none. cgroup v2: cpu.max holds "QUOTA PERIOD" or "max PERIOD";
    v1: cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us, in microseconds."""
    try:
        if (directory / "cpu.max").is_file():
            quota, period = (directory / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        if (directory / "cpu.cfs_quota_us").is_file():
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):  # unreadable or not as documented: no limit we can read
        return None
    return None


def cpu_quota() -> Optional[float]:
    """How many CPUs' worth of time this process may use, from its control groups' quotas (Docker's
    --cpus, a Kubernetes CPU limit, systemd's CPUQuota): the smallest quota on its way to the top
    of the hierarchy. None where none is set, and off Linux. Read afresh on each call: a process can
    be moved to another group while it runs."""
    try:
        dirs = cgroup_dirs(CGROUP_MEMBERSHIP.read_text(), MOUNTINFO.read_text())
    except OSError:  # not Linux, or /proc not mounted
        return None
    quotas = [quota for quota in map(quota_in, dirs) if quota is not None]
    return min(quotas) if quotas else None


def whole_cpus(quota: float) -> int:
    """The threads a CPU quota keeps running: its whole CPUs, at least one. With a quota of 1.5 CPUs,
    1 thread decoded faster than 2 (README, "Threads on a busy machine")."""
    return max(1, math.floor(quota))


def default_threads() -> int:
    """Every CPU this process may run on, but no more than the whole CPUs of its quota, if any."""
    cpus = usable_cpus()
    quota = cpu_quota()
    return cpus if quota is None else min(cpus, whole_cpus(quota))


def choose_threads(threads: Optional[int]) -> int:
    """How many CPU threads torch computes with: `threads` (up to every CPU this process may run on),
    or `default_threads`."""
    available = usable_cpus()
    if threads is None:
        return default_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= available:
        raise ValueError(f"threads must be an integer from 1 to {available} (the CPUs this process may use), "
                         f"got {threads!r}")
    return threads
