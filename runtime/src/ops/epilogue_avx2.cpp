// The output epilogue (epilogue_impl.h) built with -mavx2: eight floats a vector.
#include "op_common.h"

namespace fgq {
namespace ort {
namespace {
#include "epilogue_impl.h"
}  // namespace

void finish_row_avx2(float* y, int64_t count, const RowAddends& r, const Activation& act) {
  finish_row_impl(y, count, r, act);
}

}  // namespace ort
}  // namespace fgq
