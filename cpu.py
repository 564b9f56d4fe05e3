"""What this CPU does fast: the facts the engine's choices are made from.

A small model's speed on a CPU depends less on the model than on which instructions the CPU has:

* **native bf16** (AVX-512 BF16, AMX): a bf16 matmul runs in hardware. Without it oneDNN, the
  kernel library behind PyTorch's CPU matmuls, widens bf16 to float32 and multiplies in float32,
  so a bf16 matmul of many rows is *slower* than a float32 one (measured 2-2.5x at 512 rows with
  an Ice Lake's instruction set), while one of a few rows, which waits on memory, still gains from
  bf16's half-size weights. `float_matmul_dtype` says which dtype a matmul of many rows should run
  in: quantized layers multiply prompts in it, and bf16 layers (quantize.WidenedLinear) in float32
  wherever bf16 is emulated.
* **int8 dot products** (AVX-512 VNNI, AVX-VNNI, AMX): four 8-bit multiply-adds into one 32-bit sum
  per lane and instruction. This is what makes w8a8's integer matmul (`torch._int_mm`) fast, and
  `--quantize w8a8` is refused without it. (arm64's dot products are not counted: how fast
  `torch._int_mm` runs there is not measured, so w8a8 is not offered on arm64.)
* **how many CPUs this process may use** (`usable_cpus`): the default number of threads. Every
  decode step of a small model crosses hundreds of thread barriers, so threads on CPUs that are
  busy with other work cost far more than they bring (README, "Threads on a busy machine").

The features are read once, from PyTorch's own probe and Linux's /proc/cpuinfo, *as far as oneDNN
may use them*: an environment variable (ONEDNN_MAX_CPU_ISA) caps oneDNN's instruction set, and the
engine then chooses as it would on a CPU that has only those (`capped_features`). Tests pass
made-up `CpuFeatures` to check every decision for CPUs they do not run on.
"""

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch


CPUINFO = Path("/proc/cpuinfo")
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
    return capped_features(CpuFeatures(name=name, native_bf16=native_bf16, int8_dot=int8_dot), flags, onednn_isa_cap())


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


def choose_threads(threads: Optional[int]) -> int:
    """How many CPU threads torch computes with: `threads`, or every CPU this process may use."""
    available = usable_cpus()
    if threads is None:
        return available
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= available:
        raise ValueError(f"threads must be an integer from 1 to {available} (the CPUs this process may use), "
                         f"got {threads!r}")
    return threads
