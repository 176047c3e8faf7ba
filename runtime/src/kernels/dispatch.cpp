// Chooses the kernel path once at load, from CPUID and XGETBV (and FGQ_KERNEL).
#include <cstdlib>

#include "fgq/kernels.h"

#if defined(FGQ_HAVE_X86_KERNELS)
#include <cpuid.h>
#endif

namespace fgq {
namespace {

#if defined(FGQ_HAVE_X86_KERNELS)
struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA + F16C, YMM state enabled by the OS
  bool avx512vnni = false;  // AVX-512 F/DQ/BW/VL/VNNI, ZMM and opmask state enabled by the OS
  bool avxvnni = false;     // AVX2 and AVX-VNNI (256-bit VEX vpdpbusd)
};

uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31), vnni = c & (1u << 11);
  f.avx2 = ymm_state && avx2 && fma && f16c;
  f.avx512vnni = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl && vnni;
  __cpuid_count(7, 1, a, b, c, d);
  f.avxvnni = f.avx2 && (a & (1u << 4));
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}
#endif

struct Choice {
  const KernelDispatch* table = nullptr;
  std::string error;
};

Choice choose() {
  Choice c;
  const char* forced = std::getenv("FGQ_KERNEL");
  if (forced && *forced) {
    const std::string name(forced);
    if (name != "ref" && name != "avx2" && name != "avxvnni" && name != "avx512vnni") {
      c.error = "FGQ_KERNEL=" + name + " is not one of ref, avx2, avxvnni, avx512vnni";
    } else if (!(c.table = find_dispatch(name))) {
      c.error = "FGQ_KERNEL=" + name + " but this CPU (or this build) does not support it";
    }
    return c;
  }
  static const KernelDispatch* const best = [] {
    for (const char* name : {"avx512vnni", "avxvnni", "avx2", "ref"})
      if (const KernelDispatch* t = find_dispatch(name)) return t;
    return &kRefDispatch;
  }();
  c.table = best;
  return c;
}

}  // namespace

bool cpu_supports(const std::string& name) {
  if (name == "ref") return true;
#if defined(FGQ_HAVE_X86_KERNELS)
  if (name == "avx2") return features().avx2;
  if (name == "avxvnni") return features().avxvnni;
  if (name == "avx512vnni") return features().avx512vnni;
#endif
  return false;
}

const KernelDispatch* find_dispatch(const std::string& name) {
  if (!cpu_supports(name)) return nullptr;
  if (name == "ref") return &kRefDispatch;
#if defined(FGQ_HAVE_X86_KERNELS)
  if (name == "avx2") return &kAvx2Dispatch;
  if (name == "avxvnni") return &kAvxVnniDispatch;
  if (name == "avx512vnni") return &kAvx512VnniDispatch;
#endif
  return nullptr;
}

const KernelDispatch* active_dispatch(std::string* error) {
  // The CPU's best path is found once; FGQ_KERNEL is read at each call (the
  // ops call this once per kernel creation, so a session can force a path).
  const Choice choice = choose();
  if (!choice.table && error) *error = choice.error;
  return choice.table;
}

}  // namespace fgq
