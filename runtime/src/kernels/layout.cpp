// Packed format -> kernel layout, activation quantization helpers.
#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <limits>

#include "fgq/kernels.h"
#include "fgq/packed_format.h"

namespace fgq {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

static float scale_value(ScaleType t, const void* scales, int64_t i) {
  switch (t) {
    case ScaleType::kF32: return static_cast<const float*>(scales)[i];
    case ScaleType::kF16: return half_to_float(static_cast<const uint16_t*>(scales)[i]);
    default: return static_cast<float>(static_cast<const uint8_t*>(scales)[i]);
  }
}

int KernelWeights::t_at(int64_t m, int64_t g, int64_t i) const {
  const int64_t quad = m / 4, ri = m % 4, sg = g / 4, gq = g % 4, k = i / 4, e = i % 4;
  const uint8_t byte = quad_codes(quad)[(sg * steps() + k) * kCodeStride + gq * 4 + e];
  return ((byte >> (2 * ri)) & 3) - 1;
}

double KernelWeights::scale_at(int64_t m, int64_t g) const {
  const int64_t index = ((m / 4) * super_groups() + g / 4) * 16 + (m % 4) * 4 + g % 4;
  return scale_value(scale_type, scales.data(), index);
}

namespace {

// A packed byte's four codes for one Plane: the kernel layout's u = t + 1 of code e in byte e of
// `u`, their sum of t, and whether one is the invalid code. Groups of whole bytes (N a multiple
// of 4, no padding) are repacked a byte at a time through this table.
struct CodeByte {
  uint32_t u = 0;
  int sum = 0;
  bool invalid = false;
};

CodeByte code_byte(uint8_t byte, Plane plane) {
  CodeByte out;
  for (unsigned e = 0; e < 4; ++e) {
    const uint8_t code = static_cast<uint8_t>((byte >> (2 * e)) & 3);
    out.invalid = out.invalid || code == packed::kCodeInvalid;
    int t = code == packed::kCodeInvalid ? 0 : packed::decode(code);
    if ((plane == Plane::kPositive && t < 0) || (plane == Plane::kNegative && t > 0)) t = 0;
    out.sum += t;
    out.u |= static_cast<uint32_t>(t + 1) << (8 * e);
  }
  return out;
}

const CodeByte* code_byte_table(Plane plane) {
  static const auto tables = [] {
    std::vector<CodeByte> all(3 * 256);
    for (int p = 0; p < 3; ++p)
      for (int b = 0; b < 256; ++b) all[static_cast<size_t>(p * 256 + b)] = code_byte(static_cast<uint8_t>(b), static_cast<Plane>(p));
    return all;
  }();
  return tables.data() + static_cast<int>(plane) * 256;
}

}  // namespace

std::string repack_weights(const uint8_t* codes, int64_t rows, int64_t row_bytes, const void* scales,
                           ScaleType scale_type, const float* row_scale, const ReductionLayout& layout,
                           Plane plane, KernelWeights* out, unsigned folded_forms) {
  if (layout.n < 1 || layout.n > kMaxGroupSize || layout.length < 1 || layout.segments < 1 || rows < 0)
    return "invalid group layout";
  const int64_t G = layout.groups();
  const int64_t expected_bytes = static_cast<int64_t>(packed::row_bytes(static_cast<uint64_t>(G * layout.n)));
  if (row_bytes != expected_bytes)
    return "packed codes have " + std::to_string(row_bytes) + " bytes a row, expected ceil(G*N/4) = " +
           std::to_string(expected_bytes) + " (G=" + std::to_string(G) + ", N=" + std::to_string(layout.n) + ")";
  if (scale_type == ScaleType::kU8 && row_scale == nullptr) return "uint8 scales need a row_scale input";

  KernelWeights& w = *out;
  w = KernelWeights();
  w.rows = rows;
  w.groups = G;
  w.n = layout.n;
  w.np = kernel_group_positions(layout.n);
  w.padded_groups = kernel_padded_groups(G);
  w.quads = (rows + 3) / 4;
  w.scale_type = scale_type;
  const size_t esize = scale_size(scale_type);
  w.codes.assign(static_cast<size_t>(w.code_bytes()), 0x55);  // u = 1 (t = 0)
  w.scales.assign(static_cast<size_t>(w.quads * w.super_groups() * 16) * esize + 64, 0);
  w.row_scale.assign(static_cast<size_t>(w.panels() * 16), 0.f);  // whole panels: the folded path loads 16 rows
  w.row_offset.assign(static_cast<size_t>(w.panels() * 16), 0.f);

  // Addresses hoisted out of the loops (at session creation this ran at 80 instructions a weight).
  const int64_t gps = layout.groups_per_segment(), group_stride = w.steps() * KernelWeights::kCodeStride;
  const CodeByte* const table = code_byte_table(plane);
  for (int64_t m = 0; m < rows; ++m) {
    const uint8_t* src = codes + m * row_bytes;
    const int64_t quad = m / 4, ri = m % 4;
    const int shift = 2 * static_cast<int>(ri);
    const unsigned keep = ~(3u << shift) & 0xffu;
    const uint32_t keep_word = keep * 0x01010101u;
    uint8_t* const row_codes = w.codes.data() + (w.quad_codes(quad) - w.codes.data());
    uint8_t* const row_scales = w.scales.data() + static_cast<size_t>(quad * w.super_groups() * 16 + ri * 4) * esize;
    double offset = 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t first = (g % gps) * layout.n;  // position of the group inside its segment
      const int64_t valid = std::min(layout.n, layout.length - first);
      uint8_t* const group_codes = row_codes + (g / 4) * group_stride + (g % 4) * 4;
      int64_t sum_t = 0;
      // Whole bytes (N a multiple of 4, no padding in the group) four codes a step; else, and to name
      // an invalid code's position, one code at a time.
      bool done = layout.n % 4 == 0 && valid == layout.n;
      for (int64_t k = 0; done && k < layout.n / 4; ++k) {
        const CodeByte& c = table[src[g * layout.n / 4 + k]];
        if (c.invalid) {
          done = false;
          break;
        }
        uint32_t word;
        std::memcpy(&word, group_codes + k * KernelWeights::kCodeStride, 4);
        word = (word & keep_word) | (c.u << shift);
        std::memcpy(group_codes + k * KernelWeights::kCodeStride, &word, 4);
        sum_t += c.sum;
      }
      for (int64_t i = 0; i < layout.n && !done; ++i) {
        const uint64_t q = static_cast<uint64_t>(g * layout.n + i);
        const uint8_t code = packed::code_at(src, q);
        if (code == packed::kCodeInvalid)
          return "packed weights hold the invalid 2-bit code 0b10 (row " + std::to_string(m) + ", position " +
                 std::to_string(q) + ")";
        if (i >= valid) {
          if (code != packed::kCodeZero)
            return "packed weights hold a non-zero code in group padding (row " + std::to_string(m) +
                   ", position " + std::to_string(q) + ")";
          continue;
        }
        int t = packed::decode(code);
        if ((plane == Plane::kPositive && t < 0) || (plane == Plane::kNegative && t > 0)) t = 0;
        sum_t += t;
        uint8_t& byte = group_codes[(i / 4) * KernelWeights::kCodeStride + i % 4];
        byte = static_cast<uint8_t>((byte & keep) | static_cast<unsigned>((t + 1) << shift));
      }
      const uint8_t* from = static_cast<const uint8_t*>(scales) + static_cast<size_t>(m * G + g) * esize;
      uint8_t* to = row_scales + static_cast<size_t>((g / 4) * 16 + g % 4) * esize;
      for (size_t b = 0; b < esize; ++b) to[b] = from[b];  // 1, 2 or 4 bytes: no call to memcpy
      offset += static_cast<double>(scale_value(scale_type, scales, m * G + g)) * static_cast<double>(sum_t);
    }
    // Trailing bits of the packed row must be zero too.
    for (uint64_t q = static_cast<uint64_t>(G * layout.n); q < static_cast<uint64_t>(row_bytes) * 4; ++q)
      if (packed::code_at(src, q) != packed::kCodeZero)
        return "packed weights hold non-zero trailing bits (row " + std::to_string(m) + ")";
    const float rs = row_scale ? row_scale[m] : 1.f;
    w.row_scale[static_cast<size_t>(m)] = rs;
    w.row_offset[static_cast<size_t>(m)] = static_cast<float>(offset * static_cast<double>(rs));
  }
  if (scale_type == ScaleType::kU8 && w.positions() <= kFoldMaxPositions) fold_scales(&w, folded_forms);
  return "";
}

std::string repack_int8_weights(const int8_t* weights, int64_t rows, const float* row_scale,
                                const ReductionLayout& layout, KernelWeights* out, unsigned folded_forms) {
  if (layout.n != 1 || layout.length < 1 || layout.segments < 1 || rows < 0) return "int8 weights need N = 1";
  if (row_scale == nullptr) return "int8 weights need a row_scale input";
  const int64_t G = layout.groups(), row_bytes = (G + 3) / 4;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * row_bytes), 0), magnitudes(static_cast<size_t>(rows * G));
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const int v = weights[m * G + g];
      if (v == -128) return "int8 weights must lie in [-127, 127], got -128 (row " + std::to_string(m) + ")";
      const uint8_t code = v > 0 ? packed::kCodePlus : (v < 0 ? packed::kCodeMinus : packed::kCodeZero);
      codes[static_cast<size_t>(m * row_bytes + g / 4)] |= static_cast<uint8_t>(code << (2 * (g % 4)));
      magnitudes[static_cast<size_t>(m * G + g)] = static_cast<uint8_t>(v < 0 ? -v : v);
    }
  return repack_weights(codes.data(), rows, row_bytes, magnitudes.data(), ScaleType::kU8, row_scale, layout,
                        Plane::kAll, out, folded_forms);
}

std::string repack_dense_weights(const int8_t* weights, int64_t rows, const float* row_scale, ReductionLayout layout,
                                 KernelWeights* out) {
  if (layout.length < 1 || layout.segments < 1 || rows < 0) return "invalid reduction layout";
  if (row_scale == nullptr) return "int8 weights need a row_scale input";
  layout.n = dense_group_size(layout.length);
  KernelWeights& w = *out;
  w = KernelWeights();
  w.rows = rows;
  w.groups = layout.groups();
  w.n = layout.n;
  w.np = 4;
  w.padded_groups = kernel_padded_groups(w.groups);
  w.quads = (rows + 3) / 4;
  w.scale_type = ScaleType::kU8;
  w.dense = true;
  w.fold_planes = 1;
  if (w.positions() > kFoldMaxPositions) return "int8 weights with more than " + std::to_string(kFoldMaxPositions) +
                                                " positions a row would overflow the int32 sums";
  const int64_t elements = layout.segments * layout.length, chunks = w.positions() / 4;
  const std::vector<int64_t> map = kernel_position_map(layout, w.np, w.padded_groups);
  w.folded.assign(static_cast<size_t>(w.panels() * chunks * 64), 0);
  w.fold_bias.assign(static_cast<size_t>(w.panels() * 16), 0);
  w.row_scale.assign(static_cast<size_t>(w.panels() * 16), 0.f);
  w.row_offset.assign(static_cast<size_t>(w.panels() * 16), 0.f);
  for (int64_t m = 0; m < rows; ++m) {
    const int8_t* row = weights + m * elements;
    int8_t* panel = w.folded.data() + (m / 16) * chunks * 64 + (m % 16) * 4;
    int64_t sum = 0;
    for (int64_t p = 0; p < w.positions(); ++p) {
      const int64_t e = map[static_cast<size_t>(p)];
      if (e < 0) continue;
      if (row[e] == -128) return "int8 weights must lie in [-127, 127], got -128 (row " + std::to_string(m) + ")";
      panel[(p / 4) * 64 + p % 4] = row[e];
      sum += row[e];
    }
    w.fold_bias[static_cast<size_t>(m)] = static_cast<int32_t>(128 * sum);
    w.row_scale[static_cast<size_t>(m)] = row_scale[m];
    w.row_offset[static_cast<size_t>(m)] = static_cast<float>(static_cast<double>(sum) * static_cast<double>(row_scale[m]));
  }
  return "";
}

void fold_scales(KernelWeights* out, unsigned forms) {
  KernelWeights& w = *out;
  const int64_t chunks = w.positions() / 4;
  const int max_code = w.scales.empty() ? 0 : *std::max_element(w.scales.begin(), w.scales.end());  // padding is 0
  const int64_t planes = max_code <= 127 ? 1 : 2;
  if (planes == 2 && w.n > kFoldMaxGroupSize) return;  // two vpdpbusd a chunk: slower than the codes there
  w.fold_planes = planes;
  const bool planes_form = forms & kFoldedPlanes, ternary_form = forms & kFoldedTernary;
  if (planes_form) w.folded.assign(static_cast<size_t>(w.panels() * chunks * planes * 64), 0);
  w.fold_bias.assign(static_cast<size_t>(w.panels() * 16), 0);
  if (ternary_form) {
    w.ternary.assign(static_cast<size_t>(w.panels() * chunks * 64), 0);
    w.group_scales.assign(static_cast<size_t>(w.panels() * w.padded_groups * 32), 0);
  }
  // The codes and uint8 scales read in place (t_at and scale_at's index arithmetic a weight took a
  // quarter of a session's creation).
  const int64_t group_stride = w.steps() * KernelWeights::kCodeStride;
  for (int64_t m = 0; m < w.rows; ++m) {
    const int64_t panel = (m / 16) * chunks * planes * 64 + (m % 16) * 4;  // in w.folded
    const int64_t ternary = (m / 16) * chunks * 64 + (m % 16) * 4;  // in w.ternary
    const int64_t group_scales = (m / 16) * w.padded_groups * 32 + (m % 16) * 2;  // in w.group_scales
    const uint8_t* const row_codes = w.quad_codes(m / 4);
    const uint8_t* const row_scales = w.scales.data() + (m / 4) * w.super_groups() * 16 + (m % 4) * 4;
    const int shift = 2 * static_cast<int>(m % 4);
    int64_t sum = 0;
    for (int64_t g = 0; g < w.groups; ++g) {
      const int s = row_scales[(g / 4) * 16 + g % 4];
      const uint8_t* const group_codes = row_codes + (g / 4) * group_stride + (g % 4) * 4;
      if (ternary_form)
        w.group_scales[static_cast<size_t>(group_scales + g * 32)] =
            w.group_scales[static_cast<size_t>(group_scales + g * 32 + 1)] = static_cast<int16_t>(s);
      for (int64_t i = 0; i < w.n; ++i) {
        const int t = ((group_codes[(i / 4) * KernelWeights::kCodeStride + i % 4] >> shift) & 3) - 1, v = t * s;
        const int64_t j = (g * w.np + i) / 4;  // natural order (np is a multiple of 4)
        if (planes_form) {
          int8_t* at = w.folded.data() + panel + j * planes * 64 + i % 4;
          at[0] = static_cast<int8_t>(planes == 1 ? v : v % 128);  // v = 128 * (v / 128) + v % 128
          if (planes == 2) at[64] = static_cast<int8_t>(v / 128);
        }
        if (ternary_form) w.ternary[static_cast<size_t>(ternary + j * 64 + i % 4)] = static_cast<int8_t>(t);
        sum += v;
      }
    }
    w.fold_bias[static_cast<size_t>(m)] = static_cast<int32_t>(128 * sum);
  }
}

std::vector<int64_t> kernel_position_map(const ReductionLayout& layout, int64_t np, int64_t padded_groups) {
  std::vector<int64_t> map(static_cast<size_t>(padded_groups * np), -1);
  const int64_t gps = layout.groups_per_segment();
  for (int64_t g = 0; g < layout.groups(); ++g) {
    const int64_t segment = g / gps, first = (g % gps) * layout.n;
    const int64_t valid = std::min(layout.n, layout.length - first);
    for (int64_t i = 0; i < valid; ++i) map[static_cast<size_t>(g * np + i)] = segment * layout.length + first + i;
  }
  return map;
}

namespace {
#include "activation_impl.h"
}  // namespace

void to_kernel_order(const int8_t* natural, int64_t np, int64_t padded_groups, int8_t* out, int32_t* gsum) {
  to_kernel_order_impl(natural, np, padded_groups, out, gsum);
}

void quantize_span(const float* __restrict src, int64_t count, const ActQuant& q, int8_t* __restrict out) {
  quantize_span_impl(src, count, q, out);
}

void quantize_transposed(const float* src, int64_t channels, int64_t pixels, int64_t channel_stride, const ActQuant& q,
                         int8_t* out, int64_t pixel_stride) {
  quantize_transposed_impl(src, channels, pixels, channel_stride, q, out, pixel_stride);
}

std::string make_act_quant(float scale, int zero_point, int qmin, int qmax, bool is_signed, ActQuant* out) {
  const int lo = is_signed ? -128 : 0, hi = is_signed ? 127 : 255;
  if (!(scale > 0.f) || !std::isfinite(scale)) return "x_scale must be finite and > 0";
  if (qmin < lo || qmax > hi || qmin > qmax)
    return "act_qmin/act_qmax must satisfy " + std::to_string(lo) + " <= act_qmin <= act_qmax <= " + std::to_string(hi);
  if (zero_point < lo || zero_point > hi) return "x_zero_point out of its type's range";
  out->scale = scale;
  out->zero_point = zero_point;
  out->qmin = qmin;
  out->qmax = qmax;
  if (qmin - zero_point >= -128 && qmax - zero_point <= 127)
    out->shift = zero_point;  // offset 0: xs = q - zero_point
  else
    out->shift = is_signed ? 0 : 128;
  return "";
}


}  // namespace fgq
