"""The CPU numba compiles for (NUMBA_CPU_NAME, else this host) and which kernels it runs: float16 conversions
(float16_native), the 8-bit dot kernels' instructions (dot_kernels), AVX-512 BF16's int4 kernel (int4_dot_supported)."""

from __future__ import annotations

import functools
import re
from typing import Literal

import numba

_HALF_PROBE = """
define float @widen(i16 %bits) {
  %h = bitcast i16 %bits to half
  %f = fpext half %h to float
  ret float %f
}
define i16 @narrow(float %x) {
  %h = fptrunc float %x to half
  %bits = bitcast half %h to i16
  ret i16 %bits
}
"""


def _target_assembly(module: str) -> str:
    """LLVM IR compiled to assembly for the CPU numba compiles for (NUMBA_CPU_NAME, else this host)."""
    from llvmlite import binding

    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    cpu, features = getattr(numba.config, "CPU_NAME", None), getattr(numba.config, "CPU_FEATURES", None)
    if cpu in (None, "host"):  # numba takes this host's name, and its features unless NUMBA_CPU_FEATURES names them
        cpu = binding.get_host_cpu_name()
        features = binding.get_host_cpu_features().flatten() if features is None else features
    machine = binding.Target.from_default_triple().create_target_machine(cpu=cpu, features=features or "")
    return str(machine.emit_assembly(binding.parse_assembly(module)))


@functools.cache
def float16_native() -> bool:
    """Whether the CPU numba compiles for (NUMBA_CPU_NAME, else this host) converts float16 by instructions: F16C
    on x86 (in x86-64-v3), any AArch64. Elsewhere (x86's `generic`, x86-64-v2) LLVM calls conversion helpers that
    numba cannot link, and the process aborts: the float16 KV cache needs it (the runner keeps float32 without).
    Found by compiling the two conversions for that CPU and looking for the helpers' calls."""
    code = _target_assembly(_HALF_PROBE)
    return "__extendhfsf2" not in code and "__truncsfhf2" not in code


_EVEN, _ODD = (", ".join(f"i32 {i}" for i in range(first, 32, 2)) for first in (0, 1))  # lanes of pairs


_DOT_PROBE = f"""
define <16 x i16> @words(<16 x i16> %a, <16 x i16> %b) {{
  %sum = add <16 x i16> %a, %b
  ret <16 x i16> %sum
}}
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
define <8 x float> @fused(<8 x float> %a, <8 x float> %b, <8 x float> %c) {{
  %r = call <8 x float> @llvm.fma.v8f32(<8 x float> %a, <8 x float> %b, <8 x float> %c)
  ret <8 x float> %r
}}
define <16 x i32> @pairs(<32 x i16> %a, <32 x i16> %b, <16 x i32> %acc) {{
  %x = sext <32 x i16> %a to <32 x i32>
  %y = sext <32 x i16> %b to <32 x i32>
  %m = mul nsw <32 x i32> %x, %y
  %e = shufflevector <32 x i32> %m, <32 x i32> poison, <16 x i32> <{_EVEN}>
  %o = shufflevector <32 x i32> %m, <32 x i32> poison, <16 x i32> <{_ODD}>
  %s = add nsw <16 x i32> %e, %o
  %r = add <16 x i32> %s, %acc
  ret <16 x i32> %r
}}
"""


@functools.cache
def dot_kernels() -> Literal["avx512", "avx2"] | None:
    """Which instructions the 8-bit input and 8-bit head kernels (int4_a8_matmul, int8_matmul) take on the CPU
    numba compiles for: "avx512" where it has AVX-512 BW and VNNI (Cascade Lake, Ice Lake and later Xeons, Zen 4),
    "avx2" where it has AVX2 and FMA (an image's NUMBA_CPU_NAME=x86-64-v3), None elsewhere (torch's kernels then).
    This host's features are LLVM's; a named CPU's are found by compiling a probe for it: 16-bit products summed
    in pairs into a 512-bit accumulator (vpdpwssd on zmm only with both), 256-bit integer adds (ymm with AVX2) and
    a fused multiply-add (a call to fmaf without FMA)."""
    if _compiles_for_host():
        features = _host_features()
        if all(features.get(f) for f in ("avx512f", "avx512bw", "avx512vnni")):
            return "avx512"
        return "avx2" if features.get("avx2") and features.get("fma") else None
    code = _target_assembly(_DOT_PROBE)
    if re.search(r"vpdpwssd\s+%zmm", code):
        return "avx512"
    return "avx2" if re.search(r"vpaddw\s+%ymm", code) and re.search(r"vfmadd\w+\s+%ymm", code) else None


def _compiles_for_host() -> bool:
    """Whether numba compiles for this host's CPU (no NUMBA_CPU_NAME, or `host`)."""
    return getattr(numba.config, "CPU_NAME", None) in (None, "host")


@functools.cache
def int4_dot_supported() -> bool:
    """Whether int4_matmul (AVX-512 BF16's bfloat16 dot products) runs: numba compiles for this host, whose
    dot_kernels() are "avx512", and which has AVX-512 BF16 too (Zen 4, Sapphire Rapids; not Cascade Lake or Ice
    Lake). Kernels compiled for a named CPU leave int4 to torch's kernel."""
    return _compiles_for_host() and dot_kernels() == "avx512" and bool(_host_features().get("avx512bf16"))


def _host_features() -> dict[str, bool]:
    """This host's CPU features as numba compiles for them: LLVM's list, with NUMBA_CPU_FEATURES' +name and
    -name entries over it (numba hands LLVM that string instead, over the host CPU's own defaults)."""
    from llvmlite import binding

    features = dict(binding.get_host_cpu_features())
    for entry in (getattr(numba.config, "CPU_FEATURES", None) or "").split(","):
        if entry[:1] in ("+", "-") and entry[1:]:
            features[entry[1:]] = entry[0] == "+"
    return features
