// The output epilogue (epilogue_impl.h) for the baseline instruction set, and the choice of build.
#include <cstring>

#include "op_common.h"

namespace fgq {
namespace ort {
namespace {
#include "epilogue_impl.h"
}  // namespace

void finish_row_plain(float* y, int64_t count, const RowAddends& r, const Activation& act) {
  finish_row_impl(y, count, r, act);
}

FinishRow finish_row_for(const KernelDispatch& d) {
#if defined(FGQ_HAVE_X86_KERNELS)
  if (std::strcmp(d.name, "ref") != 0) return finish_row_avx2;  // every other path needs AVX2
#else
  (void)d;
#endif
  return finish_row_plain;
}

}  // namespace ort
}  // namespace fgq
