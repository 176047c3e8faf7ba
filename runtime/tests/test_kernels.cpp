// C++ kernel tests (ctest): the golden vectors of the packed format
// (tests/golden/packed_cases.json, from fgq_onnx/packing.py) on every kernel
// path this CPU runs, and every SIMD path against the reference on seeded
// random shapes straddling the vector widths. Integer group dots must match
// bit for bit; the fused float output within a relative 1e-5.
// A path the CPU lacks is skipped with a stated reason.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <algorithm>
#include <cctype>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fgq/kernels.h"
#include "expect.h"
#include "fgq/packed_format.h"

namespace {

// --- a minimal JSON reader (numbers, strings, arrays, objects) -------------
struct Json {
  enum Kind { kNull, kNumber, kString, kArray, kObject } kind = kNull;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::map<std::string, Json> object;
  const Json& operator[](const std::string& k) const { return object.at(k); }
  const Json& operator[](size_t i) const { return array.at(i); }
};

struct Parser {
  const std::string& s;
  size_t i = 0;
  void ws() {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  }
  Json parse() {
    ws();
    Json j;
    if (s[i] == '{') {
      j.kind = Json::kObject;
      ++i;
      ws();
      if (s[i] == '}') return ++i, j;
      for (;;) {
        ws();
        const std::string key = parse().string;
        ws();
        ++i;  // ':'
        j.object[key] = parse();
        ws();
        if (s[i++] == '}') return j;
      }
    }
    if (s[i] == '[') {
      j.kind = Json::kArray;
      ++i;
      ws();
      if (s[i] == ']') return ++i, j;
      for (;;) {
        j.array.push_back(parse());
        ws();
        if (s[i++] == ']') return j;
      }
    }
    if (s[i] == '"') {
      j.kind = Json::kString;
      ++i;
      while (s[i] != '"') j.string += s[i++];
      ++i;
      return j;
    }
    j.kind = Json::kNumber;
    size_t used = 0;
    j.number = std::stod(s.substr(i, 64), &used);
    i += used;
    return j;
  }
};

std::vector<const fgq::KernelDispatch*> paths() {
  std::vector<const fgq::KernelDispatch*> out;
  for (const char* name : {"ref", "avx2", "avxvnni", "avx512vnni"}) {
    if (const fgq::KernelDispatch* d = fgq::find_dispatch(name))
      out.push_back(d);
    else
      std::printf("SKIP path %s: this CPU (or build) does not support it\n", name);
  }
  return out;
}

// Activation row in kernel order for a single-segment layout, with its group sums.
void kernel_x(const std::vector<int>& x, const fgq::KernelWeights& w, const fgq::ReductionLayout& layout,
              std::vector<int8_t>* xs, std::vector<int32_t>* gsum) {
  const std::vector<int64_t> map = fgq::kernel_position_map(layout, w.np, w.padded_groups);
  std::vector<int8_t> natural(map.size());
  for (size_t p = 0; p < map.size(); ++p) natural[p] = map[p] < 0 ? 0 : static_cast<int8_t>(x[static_cast<size_t>(map[p])]);
  xs->assign(map.size() + 64, 0);
  gsum->assign(static_cast<size_t>(w.padded_groups) + 16, 0);
  fgq::to_kernel_order(natural.data(), w.np, w.padded_groups, xs->data(), gsum->data());
}

void test_golden(const std::vector<const fgq::KernelDispatch*>& ps) {
  std::ifstream f(std::string(FGQ_GOLDEN_DIR) + "/packed_cases.json");
  if (!f) {
    EXPECT(false, "cannot read %s/packed_cases.json", FGQ_GOLDEN_DIR);
    return;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  Parser parser{text};
  const Json root = parser.parse();
  int count = 0;
  for (const Json& c : root["cases"].array) {
    const std::string name = c["name"].string;
    const int64_t M = static_cast<int64_t>(c["M"].number), K = static_cast<int64_t>(c["K"].number),
                  N = static_cast<int64_t>(c["N"].number), G = static_cast<int64_t>(c["G"].number);
    const int64_t row_bytes = static_cast<int64_t>(c["packed"][0].array.size());
    std::vector<uint8_t> packed;
    std::vector<float> scales;
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t b = 0; b < row_bytes; ++b) packed.push_back(static_cast<uint8_t>(c["packed"][m][b].number));
      for (int64_t g = 0; g < G; ++g) scales.push_back(static_cast<float>(c["scales"][m][g].number));
    }
    // The packed bytes decode to the golden ternary values (format mirror).
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const int t = fgq::packed::decode(fgq::packed::code_at(packed.data() + m * row_bytes, k));
        EXPECT(t == static_cast<int>(c["ternary"][m][k].number), "%s: decode row %ld pos %ld", name.c_str(), (long)m, (long)k);
      }
    const fgq::ReductionLayout layout{1, K, N};
    fgq::KernelWeights w;
    const std::string err = fgq::repack_weights(packed.data(), M, row_bytes, scales.data(), fgq::ScaleType::kF32,
                                                nullptr, layout, fgq::Plane::kAll, &w);
    EXPECT(err.empty(), "%s: repack: %s", name.c_str(), err.c_str());
    if (!err.empty()) continue;
    std::vector<int> x;
    for (const Json& v : c["x"].array) x.push_back(static_cast<int>(v.number));
    std::vector<int8_t> xs;
    std::vector<int32_t> gsum;
    kernel_x(x, w, layout, &xs, &gsum);
    for (const fgq::KernelDispatch* d : ps) {
      std::vector<int32_t> dots(static_cast<size_t>(w.padded_groups));
      std::vector<float> y(static_cast<size_t>(M));
      for (int64_t m = 0; m < M; ++m) {
        d->group_dots(w, m, xs.data(), gsum.data(), dots.data());
        for (int64_t g = 0; g < G; ++g)
          EXPECT(dots[g] == static_cast<int32_t>(c["group_dots"][m][g].number), "%s/%s: group dot m=%ld g=%ld: %d",
                 name.c_str(), d->name, (long)m, (long)g, dots[g]);
        for (int64_t g = G; g < w.padded_groups; ++g) EXPECT(dots[g] == 0, "%s/%s: padding group", name.c_str(), d->name);
      }
      fgq::GemmArgs a;
      a.w = &w;
      a.x = xs.data();
      a.gsum = gsum.data();
      a.y = y.data();
      a.y_stride_m = 1;
      a.m_end = M;
      a.b_end = 1;
      d->gemm(a);
      for (int64_t m = 0; m < M; ++m) {
        const double want = c["y"][m].number;
        EXPECT(std::fabs(y[m] - want) <= 1e-5 * (1 + std::fabs(want)), "%s/%s: y[%ld] = %g, want %g", name.c_str(),
               d->name, (long)m, y[m], want);
      }
    }
    // Dequantized values through the kernel layout: one-hot activations.
    for (int64_t k = 0; k < K; ++k) {
      std::vector<int> onehot(static_cast<size_t>(K), 0);
      onehot[static_cast<size_t>(k)] = 1;
      kernel_x(onehot, w, layout, &xs, &gsum);
      std::vector<float> y(static_cast<size_t>(M));
      fgq::GemmArgs a;
      a.w = &w;
      a.x = xs.data();
      a.gsum = gsum.data();
      a.y = y.data();
      a.m_end = M;
      a.b_end = 1;
      fgq::kRefDispatch.gemm(a);
      for (int64_t m = 0; m < M; ++m)
        EXPECT(y[m] == static_cast<float>(c["dequantized"][m][k].number), "%s: dequantized [%ld, %ld]", name.c_str(),
               (long)m, (long)k);
    }
    ++count;
  }
  std::printf("golden: %d cases checked on %zu paths\n", count, ps.size());
}

// Invalid inputs are rejected, never read out of bounds.
void test_rejects() {
  fgq::KernelWeights w;
  const float scales[2] = {1, 1};
  uint8_t bad[2] = {0x02, 0x00};  // code 0b10 at position 0
  EXPECT(!fgq::repack_weights(bad, 1, 2, scales, fgq::ScaleType::kF32, nullptr, {1, 8, 4}, fgq::Plane::kAll, &w).empty(),
         "invalid code accepted");
  uint8_t late[2] = {0x01, 0x20};  // N=8: a group of whole bytes (read four codes a step), 0b10 at position 6
  const std::string late_error =
      fgq::repack_weights(late, 1, 2, scales, fgq::ScaleType::kF32, nullptr, {1, 8, 8}, fgq::Plane::kAll, &w);
  EXPECT(late_error.find("invalid 2-bit code 0b10 (row 0, position 6)") != std::string::npos,
         "invalid code in a whole-byte group: '%s'", late_error.c_str());
  uint8_t pad[1] = {0x40};  // K=3, N=4: position 3 is padding and must be 0
  EXPECT(!fgq::repack_weights(pad, 1, 1, scales, fgq::ScaleType::kF32, nullptr, {1, 3, 4}, fgq::Plane::kAll, &w).empty(),
         "non-zero padding accepted");
  uint8_t ok[2] = {0x01, 0x00};
  EXPECT(!fgq::repack_weights(ok, 1, 3, scales, fgq::ScaleType::kF32, nullptr, {1, 8, 4}, fgq::Plane::kAll, &w).empty(),
         "wrong row_bytes accepted");
  EXPECT(!fgq::repack_weights(ok, 1, 2, scales, fgq::ScaleType::kU8, nullptr, {1, 8, 4}, fgq::Plane::kAll, &w).empty(),
         "uint8 scales without row_scale accepted");
  EXPECT(fgq::repack_weights(ok, 1, 2, scales, fgq::ScaleType::kF32, nullptr, {1, 8, 4}, fgq::Plane::kAll, &w).empty(),
         "valid weights rejected");
}

uint16_t float_to_half_simple(float f) {  // for tests only: normal range, truncating
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000;
  const int e = static_cast<int>((b >> 23) & 0xff) - 127 + 15;
  if (e <= 0) return static_cast<uint16_t>(sign);
  return static_cast<uint16_t>(sign | (e << 10) | ((b >> 13) & 0x3ff));
}

// `a` written transposed (y_stride_b = 1, as Conv writes), accumulating onto ones, rows
// [1, M - 1): equals `want` (natural layout, y_stride_b = M) there, and rows outside stay 1.
void check_transposed(const fgq::KernelDispatch& d, fgq::GemmArgs a, const std::vector<float>& want, const char* what) {
  const int64_t M = a.m_end, B = a.b_end;
  std::vector<float> yt(want.size(), 1.f);
  a.y = yt.data();
  a.y_stride_b = 1;
  a.y_stride_m = B;
  a.accumulate = true;
  a.m_begin = M > 2 ? 1 : 0;
  a.m_end = M > 2 ? M - 1 : M;
  d.gemm(a);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) {
      const bool in_range = m >= a.m_begin && m < a.m_end;
      const float v = in_range ? want[static_cast<size_t>(b * M + m)] + 1.f : 1.f;
      EXPECT(std::fabs(yt[static_cast<size_t>(m * B + b)] - v) <= 1e-5f * (1.f + std::fabs(v)),
             "%s: transposed accumulate (%s) m=%ld b=%ld", d.name, what, (long)m, (long)b);
    }
}

void test_random(const std::vector<const fgq::KernelDispatch*>& ps) {
  std::mt19937 rng(1234);
  const int64_t ns[] = {1, 3, 4, 5, 8, 12, 16, 17, 32, 33, 63, 64, 65, 100, 128, 192};
  const int64_t ks[] = {1, 15, 16, 17, 63, 64, 65, 127, 200, 513};
  int cases = 0, folded_cases = 0;
  for (int64_t n : ns)
    for (int64_t k : ks)
      for (int st = 0; st < 4; ++st) {  // f32, f16, u8, u8 codes <= 127 (one folded plane)
        const int64_t M = 1 + static_cast<int64_t>(rng() % 80), B = 1 + static_cast<int64_t>(rng() % 9);  // M >= 64: four-panel blocks
        const fgq::ReductionLayout layout{1, k, n};
        const int64_t G = layout.groups(), row_bytes = (G * n + 3) / 4;
        std::vector<uint8_t> packed(static_cast<size_t>(M * row_bytes), 0);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t p = 0; p < k; ++p) {
            const int64_t q = (p / n) * n + p % n;  // one segment: group g = p / n
            const uint8_t code = static_cast<uint8_t>(rng() % 3 == 0 ? 0 : (rng() % 2 ? 1 : 3));
            packed[static_cast<size_t>(m * row_bytes + q / 4)] |= static_cast<uint8_t>(code << (2 * (q % 4)));
          }
        std::vector<float> f32(static_cast<size_t>(M * G));
        std::vector<uint16_t> f16(f32.size());
        std::vector<uint8_t> u8(f32.size());
        std::vector<float> row_scale(static_cast<size_t>(M), 0.01f);
        for (size_t i = 0; i < f32.size(); ++i) {
          f32[i] = static_cast<float>(rng() % 1000) / 997.f;
          f16[i] = float_to_half_simple(f32[i]);
          u8[i] = static_cast<uint8_t>(rng() % (st == 3 ? 128 : 256));
        }
        const fgq::ScaleType type = static_cast<fgq::ScaleType>(std::min(st, 2));
        const void* scales = st == 0 ? static_cast<const void*>(f32.data())
                                     : (st == 1 ? static_cast<const void*>(f16.data()) : static_cast<const void*>(u8.data()));
        fgq::KernelWeights w;
        const std::string err = fgq::repack_weights(packed.data(), M, row_bytes, scales, type, row_scale.data(), layout,
                                                    fgq::Plane::kAll, &w);
        EXPECT(err.empty(), "random repack: %s", err.c_str());
        const bool seven_bit = *std::max_element(u8.begin(), u8.end()) <= 127;
        const int64_t want_planes = st < 2 ? 0 : (seven_bit ? 1 : (n <= fgq::kFoldMaxGroupSize ? 2 : 0));
        EXPECT(w.fold_planes == want_planes, "folded planes %ld, want %ld (n=%ld st=%d)", (long)w.fold_planes,
               (long)want_planes, (long)n, st);
        const int64_t Kp = w.positions(), Gp = w.padded_groups;
        std::vector<int8_t> natural(static_cast<size_t>(Kp)), xs(static_cast<size_t>(B * Kp)), xu(xs.size());
        std::vector<int32_t> gsum(static_cast<size_t>(B * Gp));
        for (int64_t b = 0; b < B; ++b) {
          // Rows 0 and 1 at the ends of the int8 range (signed levels -128 / 127, or uint8 0 / 255
          // as xs = q - 128): the largest sums; the other rows random.
          for (auto& v : natural)
            v = static_cast<int8_t>(B > 2 && b < 2 ? (b == 0 ? -128 : 127) : static_cast<int>(rng() % 256) - 128);
          fgq::to_kernel_order(natural.data(), w.np, Gp, xs.data() + b * Kp, gsum.data() + b * Gp);
          for (int64_t i = 0; i < Kp; ++i) xu[static_cast<size_t>(b * Kp + i)] = static_cast<int8_t>(natural[i] ^ 0x80);
        }
        std::vector<float> y_ref(static_cast<size_t>(B * M));
        fgq::GemmArgs a;
        a.w = &w;
        a.x = xs.data();
        a.x_stride = Kp;
        a.gsum = gsum.data();
        a.s_stride = Gp;
        a.y_stride_b = M;
        a.m_end = M;
        a.b_end = B;
        a.scale = 0.5f;
        a.offset = 3.f;
        a.y = y_ref.data();
        fgq::kRefDispatch.gemm(a);
        for (const fgq::KernelDispatch* d : ps) {
          if (d == &fgq::kRefDispatch) continue;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t m = 0; m < M; ++m) {
              std::vector<int32_t> want(static_cast<size_t>(w.padded_groups)), got(want.size());
              fgq::kRefDispatch.group_dots(w, m, xs.data() + b * Kp, gsum.data() + b * Gp, want.data());
              d->group_dots(w, m, xs.data() + b * Kp, gsum.data() + b * Gp, got.data());
              EXPECT(want == got, "%s: group dots differ n=%ld k=%ld m=%ld", d->name, (long)n, (long)k, (long)m);
            }
          std::vector<float> y(y_ref.size());
          a.y = y.data();
          d->gemm(a);
          double scale_sum = 0;
          for (float v : y_ref) scale_sum = std::max(scale_sum, static_cast<double>(std::fabs(v)));
          if (fgq::use_folded(*d, w, B)) {  // the folded form from natural unsigned rows
            std::vector<float> yf(y_ref.size());
            fgq::GemmArgs fa = a;
            fa.x = xu.data();
            fa.natural = true;
            fa.gsum = nullptr;
            fa.y = yf.data();
            d->gemm(fa);
            for (size_t i = 0; i < y.size(); ++i)
              EXPECT(std::fabs(yf[i] - y_ref[i]) <= 1e-5 * (1 + scale_sum), "%s: folded gemm n=%ld k=%ld",
                     d->name, (long)n, (long)k);
            // The same rows read in place, one group a segment, segments stored in reverse
            // order: row b's group g at ((G - 1 - g) * B + b) * np; padding groups not read.
            const int64_t G = w.groups, np = w.np;
            std::vector<int8_t> scattered(static_cast<size_t>(G * B * np));
            std::vector<int64_t> row_offsets(static_cast<size_t>(B)), segment_offsets(static_cast<size_t>(G));
            for (int64_t b = 0; b < B; ++b) row_offsets[static_cast<size_t>(b)] = b * np;
            for (int64_t g = 0; g < G; ++g) {
              segment_offsets[static_cast<size_t>(g)] = (G - 1 - g) * B * np;
              for (int64_t b = 0; b < B; ++b)
                std::memcpy(scattered.data() + ((G - 1 - g) * B + b) * np, xu.data() + b * Kp + g * np,
                            static_cast<size_t>(np));
            }
            fgq::GemmArgs ia = fa;
            ia.x = scattered.data();
            ia.row_offsets = row_offsets.data();
            ia.segment_offsets = segment_offsets.data();
            ia.segments = G;
            ia.segment_len = ia.segment_read = np;
            std::vector<float> yi(y_ref.size());
            ia.y = yi.data();
            d->gemm(ia);
            EXPECT(yi == yf, "%s: folded gemm from in-place segments n=%ld k=%ld", d->name, (long)n, (long)k);
            check_transposed(*d, ia, yf, "folded, in place");
            ++folded_cases;
          }
          check_transposed(*d, a, y, "kernel order");
          if (M > 2) {  // a row range that does not start on a quad: rows outside stay untouched
            std::vector<float> part(y_ref.size(), -7.f);
            fgq::GemmArgs pa = a;
            pa.y = part.data();
            pa.m_begin = 1;
            pa.m_end = M - 1;
            d->gemm(pa);
            for (int64_t b = 0; b < B; ++b)
              for (int64_t m = 0; m < M; ++m) {
                const float v = part[static_cast<size_t>(b * M + m)];
                EXPECT(m >= 1 && m < M - 1 ? v == y[static_cast<size_t>(b * M + m)] : v == -7.f,
                       "%s: row range [1, M-1) m=%ld", d->name, (long)m);
              }
          }
          for (size_t i = 0; i < y.size(); ++i)
            EXPECT(std::fabs(y[i] - y_ref[i]) <= 1e-5 * (1 + scale_sum), "%s: gemm n=%ld k=%ld st=%d: %g vs %g", d->name,
                   (long)n, (long)k, st, y[i], y_ref[i]);
          a.y = y_ref.data();
        }
        ++cases;
      }
  std::printf("random: %d cases (%d on the folded form), SIMD paths vs reference\n", cases, folded_cases);
}

// Few activation rows (batch 1 to 3: the paths' matrix-vector kernels) bit for bit against the
// reference: integer-valued scales (f32, f16, u8) and power-of-two row and output scales keep every
// float sum exact (|sum| <= 255 * 128 * 513 < 2^24), so any lost or doubled term shows. Codes and
// levels at their extremes: t = +1 everywhere against levels -128 (the largest int16 pair sums a
// kernel can meet), t = -1 against 127, and random; K not a multiple of N or of 4; rows straddling
// quads and code lines; row ranges that start and end inside a quad.
void test_few_rows(const std::vector<const fgq::KernelDispatch*>& ps) {
  std::mt19937 rng(99);
  const int64_t ns[] = {1, 4, 5, 31, 32, 33, 64, 65, 128};
  const int64_t ks[] = {1, 15, 63, 65, 127, 200, 513};
  int cases = 0;
  for (int64_t n : ns)
    for (int64_t k : ks)
      for (int st = 0; st < 3; ++st)
        for (int pattern = 0; pattern < 3; ++pattern) {  // random; t = +1, levels -128; t = -1, levels 127
          const int64_t M = 1 + static_cast<int64_t>(rng() % 40), B = 1 + static_cast<int64_t>(rng() % 3);
          const fgq::ReductionLayout layout{1, k, n};
          const int64_t G = layout.groups(), row_bytes = (G * n + 3) / 4;
          std::vector<uint8_t> packed(static_cast<size_t>(M * row_bytes), 0);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t p = 0; p < k; ++p) {
              const uint8_t random_code = static_cast<uint8_t>(rng() % 3 == 0 ? 0 : (rng() % 2 ? 1 : 3));
              const uint8_t code = pattern == 0 ? random_code : (pattern == 1 ? 1 : 3);
              packed[static_cast<size_t>(m * row_bytes + p / 4)] |= static_cast<uint8_t>(code << (2 * (p % 4)));
            }
          std::vector<float> f32(static_cast<size_t>(M * G));
          std::vector<uint16_t> f16(f32.size());
          std::vector<uint8_t> u8(f32.size());
          for (size_t i = 0; i < f32.size(); ++i) {
            u8[i] = static_cast<uint8_t>(pattern == 0 ? rng() % 256 : 255);
            f32[i] = static_cast<float>(u8[i]);
            f16[i] = float_to_half_simple(f32[i]);  // integers up to 2048 are exact halves
          }
          std::vector<float> row_scale(static_cast<size_t>(M), 0.25f);
          const fgq::ScaleType type = static_cast<fgq::ScaleType>(st);
          const void* scales = st == 0 ? static_cast<const void*>(f32.data())
                                       : (st == 1 ? static_cast<const void*>(f16.data()) : static_cast<const void*>(u8.data()));
          fgq::KernelWeights w;
          const std::string err = fgq::repack_weights(packed.data(), M, row_bytes, scales, type, row_scale.data(), layout,
                                                      fgq::Plane::kAll, &w);
          EXPECT(err.empty(), "few rows repack: %s", err.c_str());
          std::vector<int> level(static_cast<size_t>(k));
          std::vector<int8_t> xs, one_xs;
          std::vector<int32_t> gsum, one_gsum;
          for (int64_t b = 0; b < B; ++b) {
            for (auto& v : level) v = pattern == 0 ? static_cast<int>(rng() % 256) - 128 : (pattern == 1 ? -128 : 127);
            kernel_x(level, w, layout, &one_xs, &one_gsum);
            xs.insert(xs.end(), one_xs.begin(), one_xs.end());
            gsum.insert(gsum.end(), one_gsum.begin(), one_gsum.end());
          }
          fgq::GemmArgs a;
          a.w = &w;
          a.x = xs.data();
          a.x_stride = static_cast<int64_t>(one_xs.size());
          a.gsum = gsum.data();
          a.s_stride = static_cast<int64_t>(one_gsum.size());
          a.y_stride_b = M;
          a.m_end = M;
          a.b_end = B;
          a.scale = 0.5f;
          a.offset = 3.f;
          std::vector<float> want(static_cast<size_t>(B * M));
          a.y = want.data();
          fgq::kRefDispatch.gemm(a);
          for (const fgq::KernelDispatch* d : ps) {
            std::vector<float> got(want.size(), -7.f);
            a.y = got.data();
            d->gemm(a);
            EXPECT(got == want, "%s: %ld rows, n=%ld k=%ld M=%ld st=%d pattern %d: not bit-exact", d->name, (long)B,
                   (long)n, (long)k, (long)M, st, pattern);
            for (int64_t m_begin : {int64_t{1}, int64_t{5}})  // inside the first quad / the second
              if (m_begin + 1 < M) {
                fgq::GemmArgs pa = a;  // rows [m_begin, M - 1), accumulated onto ones; the others untouched
                std::vector<float> part(want.size(), 1.f);
                pa.y = part.data();
                pa.m_begin = m_begin;
                pa.m_end = M - 1;
                pa.accumulate = true;
                d->gemm(pa);
                for (int64_t b = 0; b < B; ++b)
                  for (int64_t m = 0; m < M; ++m) {
                    const size_t i = static_cast<size_t>(b * M + m);
                    EXPECT(part[i] == (m >= m_begin && m < M - 1 ? want[i] + 1.f : 1.f),
                           "%s: %ld rows, row range [%ld, M-1) n=%ld k=%ld M=%ld m=%ld", d->name, (long)B,
                           (long)m_begin, (long)n, (long)k, (long)M, (long)m);
                  }
              }
          }
          ++cases;
        }
  std::printf("few rows: %d cases bit-exact on every path\n", cases);
}

// The folded form at its extremes, exact: every weight t * s at |s| = 127 (one plane) or 255 (two),
// all of one sign or alternating by row, against activation bytes 255, 0, or random; sizes straddling
// the vector widths (panels of 16 rows, 4-position chunks, 2- and 4-column blocks) and groups
// longer than the AVX2 path's int16 run of 64 chunks (n = 512). Row scale 1, scale 1, offset 0:
// y is the int32 sum itself (|sum| <= 128 * 255 * 600 < 2^24: exact in float), compared with a
// brute-force sum over (x - 128) * t * s. vpmaddubsw on t * s would saturate here.
void test_folded_extremes(const std::vector<const fgq::KernelDispatch*>& ps) {
  std::mt19937 rng(99);
  int cases = 0;
  for (const fgq::KernelDispatch* d : ps) {
    if (!d->folded) continue;
    for (int max_code : {127, 255})
      for (int64_t n : {1, 2, 3, 4, 8, 16, 64, 512})
        for (int64_t M : {1, 7, 8, 9, 15, 16, 17, 24, 25, 33})
          for (int64_t k : {1, 3, 5, 9, 16, 31, 33, 65, 250, 600})
            for (int pattern = 0; pattern < 3; ++pattern) {  // weights: all +, rows alternating, random
              const fgq::ReductionLayout layout{1, k, n};
              const int64_t G = layout.groups(), row_bytes = (G * n + 3) / 4;
              std::vector<uint8_t> packed(static_cast<size_t>(M * row_bytes), 0);
              std::vector<uint8_t> scales(static_cast<size_t>(M * G), static_cast<uint8_t>(max_code));
              for (int64_t m = 0; m < M; ++m)
                for (int64_t p = 0; p < k; ++p) {
                  const uint8_t random_code = rng() % 3 == 0 ? 0 : 1 + 2 * (rng() % 2);
                  const uint8_t code = pattern == 0 ? 1 : (pattern == 1 ? (m % 2 ? 3 : 1) : random_code);
                  packed[static_cast<size_t>(m * row_bytes + p / 4)] |= static_cast<uint8_t>(code << (2 * (p % 4)));
                }
              if (pattern == 2)
                for (auto& v : scales) v = static_cast<uint8_t>(rng() % (max_code + 1));
              std::vector<float> row_scale(static_cast<size_t>(M), 1.f);
              fgq::KernelWeights w;
              const std::string err = fgq::repack_weights(packed.data(), M, row_bytes, scales.data(),
                                                          fgq::ScaleType::kU8, row_scale.data(), layout,
                                                          fgq::Plane::kAll, &w);
              EXPECT(err.empty(), "extremes repack: %s", err.c_str());
              if (w.fold_planes == 0) continue;  // two planes only for n <= kFoldMaxGroupSize
              const int64_t Kp = w.positions(), B = 4 + static_cast<int64_t>(rng() % 6);
              std::vector<int8_t> xu(static_cast<size_t>(B * Kp));
              for (int64_t b = 0; b < B; ++b)
                for (int64_t i = 0; i < Kp; ++i) {  // column b % 3: all 255, all 0, random
                  const int v = b % 3 == 0 ? 255 : (b % 3 == 1 ? 0 : static_cast<int>(rng() % 256));
                  xu[static_cast<size_t>(b * Kp + i)] = static_cast<int8_t>(static_cast<uint8_t>(v));
                }
              std::vector<float> want(static_cast<size_t>(B * M)), y(want.size(), -1.f);
              for (int64_t b = 0; b < B; ++b)
                for (int64_t m = 0; m < M; ++m) {
                  int64_t sum = 0;
                  for (int64_t g = 0; g < w.padded_groups; ++g)
                    for (int64_t i = 0; i < w.np; ++i) {
                      const int x = static_cast<uint8_t>(xu[static_cast<size_t>(b * Kp + g * w.np + i)]) - 128;
                      sum += static_cast<int64_t>(w.t_at(m, g, i)) * static_cast<int64_t>(w.scale_at(m, g)) * x;
                    }
                  want[static_cast<size_t>(b * M + m)] = static_cast<float>(sum);
                }
              fgq::GemmArgs a;
              a.w = &w;
              a.x = xu.data();
              a.x_stride = Kp;
              a.natural = true;
              a.y = y.data();
              a.y_stride_b = M;
              a.m_end = M;
              a.b_end = B;
              d->gemm(a);
              EXPECT(y == want, "%s: folded extremes n=%ld M=%ld k=%ld codes<=%d pattern %d", d->name, (long)n, (long)M,
                     (long)k, max_code, pattern);
              check_transposed(*d, a, want, "folded extremes");
              ++cases;
            }
  }
  std::printf("folded extremes: %d cases\n", cases);
}

// The folded store's 8-bit levels ([B, M], not accumulated: levels_in_store) against StoreEpilogue::apply on
// what the call stores without an epilogue, bit for bit: a residual as levels (uint8 or int8, or float, or
// none) and the output quantized (uint8 or int8, or float), over a row and column range inside the panels
// and blocks; the bytes and floats outside it stay untouched.
void check_store_levels(const fgq::KernelDispatch& d, fgq::GemmArgs a, fgq::StoreEpilogue e, std::mt19937& rng) {
  const int64_t M = a.m_end, B = a.b_end;
  a.m_begin = M > 20 ? 3 : 0;
  a.m_end = M > 40 ? M - 18 : M;
  a.b_begin = B > 3 ? 1 : 0;
  a.b_end = B > 9 ? B - 2 : B;
  a.scale = 0.3f;
  EXPECT(fgq::levels_in_store(d, a), "%s: levels_in_store refuses a [B, M] call", d.name);
  std::vector<int8_t> residual(static_cast<size_t>(M * B));
  for (auto& v : residual) v = static_cast<int8_t>(rng() % 256);
  if ((M + B) % 3 != 2) {  // else the float residual (or none) kept from `e`
    e.residual = nullptr;
    e.residual_levels = (M + B) % 3 == 0 ? residual.data() : nullptr;
    e.residual_signed = B % 2 == 0;
    e.residual_zero = e.residual_signed ? -3 : 120;
    e.residual_scale = 0.05f;
  }
  const bool out_signed = M % 2 == 0, out_float = (M * B) % 5 == 0;
  std::string error = fgq::make_act_quant(0.1f, out_signed ? 5 : 17, out_signed ? -128 : 0, out_signed ? 127 : 255,
                                         out_signed, &e.out_quant);
  EXPECT(error.empty(), "%s", error.c_str());
  if (!out_signed) e.out_quant = fgq::unsigned_levels(e.out_quant);  // the bytes are the uint8 levels
  std::vector<float> plain(static_cast<size_t>(M * B), -7.f), y(plain.size(), -7.f);
  std::vector<int8_t> out(plain.size(), 0x5A);
  e.out_levels = out_float ? nullptr : out.data();
  a.y = plain.data();
  a.epilogue = nullptr;
  d.gemm(a);
  a.y = out_float ? y.data() : nullptr;
  a.epilogue = &e;
  d.gemm(a);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) {
      const bool inside = m >= a.m_begin && m < a.m_end && b >= a.b_begin && b < a.b_end;
      const size_t at = static_cast<size_t>(b * M + m);
      const float r = e.has_residual() ? e.residual_at(static_cast<int64_t>(at)) : 0.f;
      const float v = e.apply(plain[at], m, e.has_residual() ? &r : nullptr);
      if (out_float) {
        const float expected = inside ? v : -7.f;
        EXPECT(std::memcmp(&y[at], &expected, sizeof(float)) == 0, "%s: store levels (float out) M=%ld B=%ld m=%ld b=%ld: %g, want %g",
               d.name, (long)M, (long)B, (long)m, (long)b, y[at], expected);
      } else {
        const int8_t expected = inside ? fgq::quantize_one(v, e.out_quant) : static_cast<int8_t>(0x5A);
        EXPECT(out[at] == expected, "%s: store levels M=%ld B=%ld m=%ld b=%ld: %d, want %d", d.name, (long)M, (long)B,
               (long)m, (long)b, out[at], expected);
      }
    }
}

// A folded store's epilogue (GemmArgs::epilogue) against StoreEpilogue::apply on what the same call
// stores without it, bit for bit, at an output scale whose products round (so that a multiply and
// the bias add fused into one FMA would show): `rows` writes [B, M] over all rows and columns, `tile`
// a row and column range of [M, B], stored or accumulated onto ones; the bias (one of them NaN, which
// every activation keeps), the residual (laid out as the output) and the activation (none, ReLU, Clip,
// HardSigmoid, HardSwish, each with or without the affine map) vary with the shape. Outputs outside the
// tile stay untouched.
void check_store_epilogue(const fgq::KernelDispatch& d, fgq::GemmArgs rows, fgq::GemmArgs tile, std::mt19937& rng) {
  const int64_t M = rows.m_end, B = rows.b_end;
  std::vector<float> bias(static_cast<size_t>(M));
  for (auto& v : bias) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 64.f + 0.01f;
  bias[static_cast<size_t>(M / 2)] = std::numeric_limits<float>::quiet_NaN();
  const int kind = static_cast<int>((M + B) % 5);  // none, ReLU, Clip, HardSigmoid, HardSwish
  fgq::StoreEpilogue e;
  e.bias = (M + B) % 4 != 3 ? bias.data() : nullptr;
  if (kind == 1 || kind == 2) e.lo = kind == 1 ? 0.f : -3.5f;
  if (kind == 2) e.hi = 6.f;
  if (kind == 3) e.kind = fgq::StoreEpilogue::kHardSigmoid, e.alpha = 0.2f, e.beta = 0.5f;
  if (kind == 4) e.kind = fgq::StoreEpilogue::kHardSwish;
  if ((M * B) % 3 == 0) e.affine = true, e.scale = 1.7f, e.shift = -0.3f;  // the affine map, on any kind
  std::vector<float> residual(static_cast<size_t>(M * B));  // laid out as the output, either layout
  for (auto& v : residual) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 32.f + 0.03f;
  e.residual = (M * B) % 4 != 1 ? residual.data() : nullptr;
  for (fgq::GemmArgs* a : {&rows, &tile}) {
    const bool by_rows = a == &rows;
    const float before = a->accumulate ? 1.f : -7.f;
    a->scale = 0.3f;
    std::vector<float> plain(static_cast<size_t>(M * B), before), y(plain.size(), before);
    a->y = plain.data();
    d.gemm(*a);
    a->y = y.data();
    a->epilogue = &e;
    d.gemm(*a);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t m = 0; m < M; ++m) {
        const bool inside = m >= a->m_begin && m < a->m_end && b >= a->b_begin && b < a->b_end;
        const size_t at = static_cast<size_t>(by_rows ? b * M + m : m * B + b);
        const float expected = inside ? e.apply(plain[at], m, e.residual ? e.residual + at : nullptr) : before;
        EXPECT(std::memcmp(&y[at], &expected, sizeof(float)) == 0,
               "%s: store epilogue (%s) M=%ld B=%ld m=%ld b=%ld: %g, want %g", d.name, by_rows ? "[B, M]" : "[M, B] tile",
               (long)M, (long)B, (long)m, (long)b, y[at], expected);
      }
  }
  check_store_levels(d, rows, e, rng);
}

// Runs `t` (a row and column range of activation rows, stored or accumulated: t.accumulate) into y
// [M, B] (a convolution's layout) filled with ones or -7, and checks that the range holds `want`
// ([B, M]; plus one when accumulating) and the rest is untouched.
void check_tile(const fgq::KernelDispatch& d, fgq::GemmArgs& t, const std::vector<float>& want, int64_t M,
                              int64_t B, const std::string& what) {
  const float before = t.accumulate ? 1.f : -7.f;
  std::vector<float> yt(want.size(), before);
  t.y = yt.data();
  t.y_stride_b = 1;
  t.y_stride_m = B;
  d.gemm(t);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) {
      const bool inside = m >= t.m_begin && m < t.m_end && b >= t.b_begin && b < t.b_end;
      const float stored = want[static_cast<size_t>(b * M + m)] + (t.accumulate ? 1.f : 0.f);
      const float v = yt[static_cast<size_t>(m * B + b)], expected = inside ? stored : before;
      EXPECT(v == expected, "%s: %s, [M, B] M=%ld B=%ld m=%ld b=%ld: %g, want %g", d.name, what.c_str(), (long)M,
             (long)B, (long)m, (long)b, v, expected);
    }
}

// The folded form's register tiles and their edges, bit for bit against the reference: every M
// in 1..70 (blocks of 1-4 panels, the last panel part empty), every B in 1..20 (blocks of 1-8
// activation rows), K straddling 4-position chunks and 16-chunk panels, one and two planes.
// Integer scale codes and power-of-two row and output scales keep every float sum exact
// (|sum| <= 255 * 128 * 264 < 2^24). Each case runs twice: rows contiguous into y [B, M]; and
// rows read in place (segments of one group, stored in reverse order) into y [M, B] (a
// convolution's layout), a row range and a column range inside the panels and blocks, stored
// or accumulated onto ones, the rest untouched.
void test_folded_tiles(const std::vector<const fgq::KernelDispatch*>& ps) {
  std::mt19937 rng(2024);
  const int64_t ks[] = {5, 64, 130, 264};
  int cases = 0;
  for (int64_t M = 1; M <= 70; ++M)
    for (int64_t B = 1; B <= 20; ++B) {
      const int64_t k = ks[(M + B) % 4], n = (M * B) % 3 == 0 ? 8 : 4;
      const int max_code = (M + 2 * B) % 2 ? 255 : 127;  // two planes, one
      const fgq::ReductionLayout layout{1, k, n};
      const int64_t G = layout.groups(), row_bytes = (G * n + 3) / 4;
      std::vector<uint8_t> packed(static_cast<size_t>(M * row_bytes), 0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t p = 0; p < k; ++p) {
          const uint8_t code = static_cast<uint8_t>(rng() % 3 == 0 ? 0 : (rng() % 2 ? 1 : 3));
          packed[static_cast<size_t>(m * row_bytes + p / 4)] |= static_cast<uint8_t>(code << (2 * (p % 4)));
        }
      std::vector<uint8_t> scales(static_cast<size_t>(M * G));
      for (auto& v : scales) v = static_cast<uint8_t>(rng() % (max_code + 1));
      scales[0] = static_cast<uint8_t>(max_code);
      const std::vector<float> row_scale(static_cast<size_t>(M), 0.25f);
      fgq::KernelWeights w;
      const std::string err = fgq::repack_weights(packed.data(), M, row_bytes, scales.data(), fgq::ScaleType::kU8,
                                                  row_scale.data(), layout, fgq::Plane::kAll, &w);
      EXPECT(err.empty() && w.fold_planes == (max_code == 255 ? 2 : 1), "tiles repack: %s, %ld planes", err.c_str(),
             (long)w.fold_planes);
      const int64_t Kp = w.positions(), Gp = w.padded_groups, np = w.np;
      std::vector<int8_t> natural(static_cast<size_t>(Kp)), xs(static_cast<size_t>(B * Kp)), xu(xs.size());
      std::vector<int32_t> gsum(static_cast<size_t>(B * Gp));
      for (int64_t b = 0; b < B; ++b) {
        for (auto& v : natural) v = static_cast<int8_t>(b == 0 ? -128 : static_cast<int>(rng() % 256) - 128);
        for (int64_t g = G; g < Gp; ++g)  // padding groups meet zero weights: any level
          for (int64_t i = 0; i < np; ++i) natural[static_cast<size_t>(g * np + i)] = 0;
        fgq::to_kernel_order(natural.data(), np, Gp, xs.data() + b * Kp, gsum.data() + b * Gp);
        for (int64_t i = 0; i < Kp; ++i) xu[static_cast<size_t>(b * Kp + i)] = static_cast<int8_t>(natural[i] ^ 0x80);
      }
      fgq::GemmArgs ref;
      ref.w = &w;
      ref.x = xs.data();
      ref.x_stride = Kp;
      ref.gsum = gsum.data();
      ref.s_stride = Gp;
      ref.y_stride_b = M;
      ref.m_end = M;
      ref.b_end = B;
      ref.scale = 0.5f;
      ref.offset = 3.f;
      std::vector<float> want(static_cast<size_t>(B * M));
      ref.y = want.data();
      fgq::kRefDispatch.gemm(ref);
      // In place: row b's group g at ((G - 1 - g) * B + b) * np.
      std::vector<int8_t> scattered(static_cast<size_t>(G * B * np + 64));
      std::vector<int64_t> row_offsets(static_cast<size_t>(B)), segment_offsets(static_cast<size_t>(G));
      for (int64_t b = 0; b < B; ++b) row_offsets[static_cast<size_t>(b)] = b * np;
      for (int64_t g = 0; g < G; ++g) {
        segment_offsets[static_cast<size_t>(g)] = (G - 1 - g) * B * np;
        for (int64_t b = 0; b < B; ++b)
          std::memcpy(scattered.data() + ((G - 1 - g) * B + b) * np, xu.data() + b * Kp + g * np, static_cast<size_t>(np));
      }
      for (const fgq::KernelDispatch* d : ps) {
        if (!d->folded) continue;  // B < 4 too: the ops take the codes there, the kernel takes any B
        fgq::GemmArgs a = ref;
        a.x = xu.data();
        a.natural = true;
        a.gsum = nullptr;
        std::vector<float> y(want.size(), -7.f);
        a.y = y.data();
        d->gemm(a);
        EXPECT(y == want, "%s: folded tiles M=%ld B=%ld k=%ld n=%ld planes=%ld: not bit-exact", d->name, (long)M,
               (long)B, (long)k, (long)n, (long)w.fold_planes);
        fgq::GemmArgs t = a;
        t.x = scattered.data();
        t.row_offsets = row_offsets.data();
        t.segment_offsets = segment_offsets.data();
        t.segments = G;
        t.segment_len = t.segment_read = np;
        t.accumulate = (M + B) % 3 != 0;
        t.m_begin = M > 20 ? 3 : 0;
        t.m_end = M > 40 ? M - 18 : M;
        t.b_begin = B > 3 ? 1 : 0;
        t.b_end = B > 9 ? B - 2 : B;
        check_tile(*d, t, want, M, B, "folded tiles in place k=" + std::to_string(k));
        if (d->folded_epilogue) check_store_epilogue(*d, a, t, rng);
        ++cases;
      }
    }
  std::printf("folded tiles: %d cases bit-exact\n", cases);
}

// Random int8 weights [M, E] in [-127, 127] (a quarter zero, the first +127, the last -127), and
// power-of-two row scales: with integer levels every float sum of int8_gemm stays exact.
std::vector<int8_t> random_int8_weights(std::mt19937& rng, int64_t M, int64_t E) {
  std::vector<int8_t> weights(static_cast<size_t>(M * E));
  for (auto& v : weights) v = static_cast<int8_t>(rng() % 4 == 0 ? 0 : static_cast<int>(rng() % 255) - 127);
  weights[0] = 127;
  weights.back() = -127;
  return weights;
}
std::vector<float> power_of_two_row_scales(int64_t M) {
  std::vector<float> row_scale(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) row_scale[static_cast<size_t>(m)] = std::ldexp(1.f, -static_cast<int>(m % 5));
  return row_scale;
}

// The int8 GEMM written out: y[b, m] = scale * row_scale[m] * (sum_e w[m, e] * levels[b, e] + offset * sum_e w[m, e]).
std::vector<float> int8_gemm(const std::vector<int8_t>& weights, const std::vector<int>& levels,
                             const std::vector<float>& row_scale, int64_t M, int64_t B, int64_t E, float scale, float offset) {
  std::vector<float> y(static_cast<size_t>(B * M));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) {
      int64_t dot = 0, sum = 0;
      for (int64_t e = 0; e < E; ++e) {
        dot += weights[static_cast<size_t>(m * E + e)] * levels[static_cast<size_t>(b * E + e)];
        sum += weights[static_cast<size_t>(m * E + e)];
      }
      y[static_cast<size_t>(b * M + m)] =
          static_cast<float>(scale * row_scale[static_cast<size_t>(m)] * (static_cast<double>(dot) + offset * sum));
    }
  return y;
}

// int8 weights (repack_int8_weights, N = 1) on every path, bit for bit against the int8 GEMM written
// out: y[b, m] = scale * row_scale[m] * (sum_k w[m, k] * xs[b, k] + offset * sum_k w[m, k]). Power-of-two
// row and output scales keep every float sum exact (|sum| <= 127 * 128 * 130 * 2 < 2^24). The code path
// (kernel-order rows) and, where the path has it, the folded form (natural unsigned rows); the weights
// take +-127, 0 and the other codes. Also the rejects: -128, N != 1, no row_scale; and repack_dense_weights'
// (-128, no row_scale, more positions than int32 sums allow).
void test_int8_weights(const std::vector<const fgq::KernelDispatch*>& ps) {
  std::mt19937 rng(8);
  int cases = 0;
  for (int64_t M : {1, 3, 17, 33})
    for (int64_t k : {1, 5, 15, 16, 17, 63, 64, 65, 130})
      for (int64_t B : {1, 3, 4, 9}) {
        const fgq::ReductionLayout layout{1, k, 1};
        const std::vector<int8_t> weights = random_int8_weights(rng, M, k);
        const std::vector<float> row_scale = power_of_two_row_scales(M);
        fgq::KernelWeights w;
        const std::string err = fgq::repack_int8_weights(weights.data(), M, row_scale.data(), layout, &w);
        EXPECT(err.empty() && w.fold_planes == 1, "int8 repack: '%s', %ld planes", err.c_str(), (long)w.fold_planes);
        if (!err.empty()) continue;
        const int64_t Kp = w.positions(), Gp = w.padded_groups;
        std::vector<int> levels(static_cast<size_t>(B * k));
        for (auto& v : levels) v = static_cast<int>(rng() % 256) - 128;
        std::vector<int8_t> xs(static_cast<size_t>(B * (Kp + 64))), xu(static_cast<size_t>(B * Kp + 64), 0);
        std::vector<int32_t> gsum(static_cast<size_t>(B * (Gp + 16)));
        const std::vector<int64_t> map = fgq::kernel_position_map(layout, w.np, Gp);
        for (int64_t b = 0; b < B; ++b) {
          std::vector<int8_t> row, natural;
          std::vector<int32_t> sums;
          kernel_x(std::vector<int>(levels.begin() + b * k, levels.begin() + (b + 1) * k), w, layout, &row, &sums);
          std::copy(row.begin(), row.end(), xs.begin() + b * (Kp + 64));
          std::copy(sums.begin(), sums.end(), gsum.begin() + b * (Gp + 16));
          for (size_t p = 0; p < map.size(); ++p)
            xu[static_cast<size_t>(b * Kp) + p] = static_cast<int8_t>((map[p] < 0 ? 0 : levels[static_cast<size_t>(b * k + map[p])]) ^ 0x80);
        }
        const float scale = 0.5f, offset = 3.f;
        const std::vector<float> want = int8_gemm(weights, levels, row_scale, M, B, k, scale, offset);
        fgq::GemmArgs a;
        a.w = &w;
        a.x = xs.data();
        a.x_stride = Kp + 64;
        a.gsum = gsum.data();
        a.s_stride = Gp + 16;
        a.y_stride_b = M;
        a.m_end = M;
        a.b_end = B;
        a.scale = scale;
        a.offset = offset;
        for (const fgq::KernelDispatch* d : ps) {
          std::vector<float> y(want.size(), -7.f);
          a.y = y.data();
          d->gemm(a);
          EXPECT(y == want, "%s: int8 weights, code path M=%ld k=%ld B=%ld: not bit-exact", d->name, (long)M, (long)k,
                 (long)B);
          if (fgq::use_folded(*d, w, B)) {
            fgq::GemmArgs f = a;
            f.x = xu.data();
            f.x_stride = Kp;
            f.natural = true;
            f.gsum = nullptr;
            std::vector<float> yf(want.size(), -7.f);
            f.y = yf.data();
            d->gemm(f);
            EXPECT(yf == want, "%s: int8 weights, folded M=%ld k=%ld B=%ld: not bit-exact", d->name, (long)M, (long)k,
                   (long)B);
          }
          ++cases;
        }
      }
  fgq::KernelWeights w;
  const int8_t bad[2] = {5, -128};
  const float rs[1] = {1.f};
  EXPECT(!fgq::repack_int8_weights(bad, 1, rs, {1, 2, 1}, &w).empty(), "int8 weight -128 accepted");
  EXPECT(!fgq::repack_int8_weights(bad, 1, rs, {1, 2, 2}, &w).empty(), "int8 weights at N = 2 accepted");
  EXPECT(!fgq::repack_int8_weights(bad, 1, nullptr, {1, 1, 1}, &w).empty(), "int8 weights without row_scale accepted");
  EXPECT(!fgq::repack_dense_weights(bad, 1, rs, {1, 2, 1}, &w).empty(), "dense weight -128 accepted");
  EXPECT(!fgq::repack_dense_weights(bad, 1, nullptr, {1, 2, 1}, &w).empty(), "dense weights without row_scale accepted");
  const std::vector<int8_t> long_row(static_cast<size_t>(fgq::kFoldMaxPositions + 1), 1);
  EXPECT(!fgq::repack_dense_weights(long_row.data(), 1, rs, {1, fgq::kFoldMaxPositions + 1, 1}, &w).empty(),
         "dense weights past kFoldMaxPositions accepted");
  std::printf("int8 weights: %d cases bit-exact\n", cases);
}

// Dense int8 weights (repack_dense_weights) on every path, the reference included, bit for bit against
// the int8 GEMM written out: y[b, m] = scale * row_scale[m] * (sum_e w[m, e] * xs[b, e] + offset * sum_e
// w[m, e]) (power-of-two scales keep every float sum exact: |sum| <= 127 * 128 * 153 * 2 < 2^24). Segments
// shorter than a chunk (per-tap stems) and longer; every B from 1 (use_folded for any B); rows contiguous
// into [B, M], and read in place from scattered segments into [M, B] over a row and column range, stored or
// accumulated. (Its rejects are test_int8_weights'.)
void test_dense_weights(const std::vector<const fgq::KernelDispatch*>& ps) {
  std::mt19937 rng(11);
  int cases = 0;
  for (int64_t segments : {1, 3, 9})
    for (int64_t length : {1, 2, 3, 4, 5, 16, 17})
      for (int64_t M : {1, 5, 17, 40})
        for (int64_t B : {1, 2, 3, 5, 9}) {
          const int64_t E = segments * length;
          const std::vector<int8_t> weights = random_int8_weights(rng, M, E);
          const std::vector<float> row_scale = power_of_two_row_scales(M);
          fgq::KernelWeights w;
          const std::string err = fgq::repack_dense_weights(weights.data(), M, row_scale.data(), {segments, length, 1}, &w);
          EXPECT(err.empty() && w.dense, "dense repack: '%s'", err.c_str());
          if (!err.empty()) continue;
          const fgq::ReductionLayout layout{segments, length, fgq::dense_group_size(length)};
          const int64_t Kp = w.positions(), segment_len = layout.groups_per_segment() * 4;
          EXPECT(w.n == layout.n && w.np == 4 && Kp == fgq::dense_positions(segments, length),
                 "dense layout n=%ld np=%ld positions=%ld", (long)w.n, (long)w.np, (long)Kp);
          std::vector<int> levels(static_cast<size_t>(B * E));
          for (auto& v : levels) v = static_cast<int>(rng() % 256) - 128;
          // Natural unsigned rows; and in place, row b's segment k at ((segments - 1 - k) * B + b) * segment_len.
          const std::vector<int64_t> map = fgq::kernel_position_map(layout, 4, w.padded_groups);
          std::vector<int8_t> xu(static_cast<size_t>(B * Kp + 64), 0), scattered(static_cast<size_t>(segments * B * segment_len + 64));
          std::vector<int64_t> row_offsets(static_cast<size_t>(B)), segment_offsets(static_cast<size_t>(segments));
          for (int64_t b = 0; b < B; ++b) {
            for (int64_t p = 0; p < Kp; ++p) {
              const int64_t e = map[static_cast<size_t>(p)];
              xu[static_cast<size_t>(b * Kp + p)] = static_cast<int8_t>((e < 0 ? 0 : levels[static_cast<size_t>(b * E + e)]) ^ 0x80);
            }
            row_offsets[static_cast<size_t>(b)] = b * segment_len;
            for (int64_t k = 0; k < segments; ++k) {
              segment_offsets[static_cast<size_t>(k)] = (segments - 1 - k) * B * segment_len;
              std::memcpy(scattered.data() + ((segments - 1 - k) * B + b) * segment_len, xu.data() + b * Kp + k * segment_len,
                          static_cast<size_t>(segment_len));
            }
          }
          const float scale = 0.5f, offset = 3.f;
          const std::vector<float> want = int8_gemm(weights, levels, row_scale, M, B, E, scale, offset);
          fgq::GemmArgs a;
          a.w = &w;
          a.x = xu.data();
          a.x_stride = Kp;
          a.natural = true;
          a.y_stride_b = M;
          a.m_end = M;
          a.b_end = B;
          a.scale = scale;
          a.offset = offset;
          for (const fgq::KernelDispatch* d : ps) {
            EXPECT(fgq::use_folded(*d, w, B), "%s: dense weights not run from natural rows at B=%ld", d->name, (long)B);
            std::vector<float> y(want.size(), -7.f);
            a.y = y.data();
            d->gemm(a);
            EXPECT(y == want, "%s: dense weights segments=%ld length=%ld M=%ld B=%ld: not bit-exact", d->name,
                   (long)segments, (long)length, (long)M, (long)B);
            fgq::GemmArgs t = a;
            t.x = scattered.data();
            t.row_offsets = row_offsets.data();
            t.segment_offsets = segment_offsets.data();
            t.segments = segments;
            t.segment_len = segment_len;
            t.segment_read = (length + 3) / 4 * 4;  // the rest of a segment meets zero weights: not read
            t.accumulate = (M + B) % 2 != 0;
            t.m_begin = M > 16 ? 3 : 0;
            t.m_end = M > 20 ? M - 5 : M;
            t.b_begin = B > 2 ? 1 : 0;
            t.b_end = B > 4 ? B - 1 : B;
            check_tile(*d, t, want, M, B,
                       "dense weights in place segments=" + std::to_string(segments) + " length=" + std::to_string(length));
            if (d->folded_epilogue) check_store_epilogue(*d, a, t, rng);
            ++cases;
          }
        }
  std::printf("dense int8 weights: %d cases bit-exact\n", cases);
}

// The activation slots of every path equal the scalar definitions.
void test_activation_slots(const std::vector<const fgq::KernelDispatch*>& ps) {
  std::mt19937 rng(7);
  std::vector<float> x(1000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = (static_cast<float>(rng() % 2001) - 1000.f) / 8.f;  // many ties at scale 0.25
  x[3] = NAN;
  x[4] = INFINITY;
  x[5] = -INFINITY;
  x[6] = 1e30f;
  for (bool is_signed : {false, true})
    for (int qmax : {15, 255}) {
      fgq::ActQuant q;
      const int lo = is_signed ? -8 : 0, hi = is_signed ? (qmax == 15 ? 7 : 127) : qmax;
      const std::string err = fgq::make_act_quant(0.25f, is_signed ? 0 : 3, lo == 0 && qmax == 255 ? 0 : lo, hi,
                                                  is_signed, &q);
      EXPECT(err.empty(), "make_act_quant: %s", err.c_str());
      std::vector<int8_t> want(x.size());
      for (size_t i = 0; i < x.size(); ++i) want[i] = fgq::quantize_one(x[i], q);
      for (const fgq::KernelDispatch* d : ps) {
        std::vector<int8_t> got(x.size());
        d->quantize(x.data(), static_cast<int64_t>(x.size()), q, got.data());
        EXPECT(got == want, "%s: quantize differs from quantize_one", d->name);
        // x as [channels][pixels] (channel stride 25) -> pixel-major rows of pixel_stride bytes
        for (int64_t channels : {1, 3, 16, 17, 39})
          for (int64_t pixels : {1, 7, 16, 25}) {
            const int64_t pixel_stride = channels + 5;
            std::vector<int8_t> nhwc(static_cast<size_t>(pixels * pixel_stride), 99);
            d->quantize_transposed(x.data(), channels, pixels, 25, q, nhwc.data(), pixel_stride);
            for (int64_t p = 0; p < pixels; ++p)
              for (int64_t c = 0; c < pixel_stride; ++c) {
                const int8_t v = nhwc[static_cast<size_t>(p * pixel_stride + c)];
                EXPECT(v == (c < channels ? want[static_cast<size_t>(c * 25 + p)] : 99),
                       "%s: quantize_transposed c=%ld p=%ld (%ld channels, %ld pixels)", d->name, (long)c, (long)p,
                       (long)channels, (long)pixels);
              }
          }
      }
    }
  for (int64_t np : {4, 8, 12, 16, 20, 28, 64, 68, 128})
    for (int64_t gp : {4, 8, 12}) {
      std::vector<int8_t> natural(static_cast<size_t>(np * gp));
      for (auto& v : natural) v = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
      std::vector<int8_t> want(natural.size()), got(natural.size());
      std::vector<int32_t> want_sum(static_cast<size_t>(gp)), got_sum(static_cast<size_t>(gp));
      for (int64_t g = 0; g < gp; ++g) {  // the definition, written out
        int32_t sum = 0;
        for (int64_t i = 0; i < np; ++i) {
          const int8_t v = natural[static_cast<size_t>(g * np + i)];
          sum += v;
          want[static_cast<size_t>((g / 4) * np * 4 + (i / 4) * 16 + (g % 4) * 4 + i % 4)] = v;
        }
        want_sum[static_cast<size_t>(g)] = sum;
      }
      fgq::to_kernel_order(natural.data(), np, gp, got.data(), got_sum.data());
      EXPECT(got == want && got_sum == want_sum, "to_kernel_order np=%ld", (long)np);
      for (const fgq::KernelDispatch* d : ps) {
        d->kernel_order(natural.data(), np, gp, got.data(), got_sum.data());
        EXPECT(got == want && got_sum == want_sum, "%s: kernel order np=%ld", d->name, (long)np);
      }
    }
}

// The first index where a and b (of a's size) differ, or that size.
size_t first_difference(const std::vector<int8_t>& a, const std::vector<int8_t>& b) {
  return static_cast<size_t>(std::mismatch(a.begin(), a.end(), b.begin()).first - a.begin());
}

// Every path's quantize and quantize_transposed equal quantize_one (x / scale, the definition)
// bit for bit where a vector version could differ: a band of ulps around each level boundary
// (scale * (k + 1/2)) and each level and clamp bound, for awkward and extreme scales (denormal ones
// too); plus random bit patterns, infinities, NaN, zeros and denormals.
void test_quantize_exact(const std::vector<const fgq::KernelDispatch*>& ps) {
  const float scales[] = {0.1f, 1.f / 3, 0.0078431f, 3e-5f, 1e4f, 0.25f, 1.f, 0x1p-126f, 0x1.8p-127f, 1e-45f,
                          0x1p126f, 0x1.4p126f, 3e38f};
  struct Range { bool is_signed; int zero, qmin, qmax; };
  const Range ranges[] = {{false, 0, 0, 255}, {false, 131, 0, 255}, {true, 0, -128, 127}, {true, -3, -8, 7}};
  std::mt19937 rng(11);
  std::vector<float> randoms;
  for (int i = 0; i < 20000; ++i) {
    const uint32_t bits = static_cast<uint32_t>(rng());
    float f;
    std::memcpy(&f, &bits, 4);
    randoms.push_back(f);
  }
  for (float f : {0.f, -0.f, INFINITY, -INFINITY, NAN, -NAN, 1e-45f, -1e-45f, 0x1p-126f, 3.4e38f, -3.4e38f})
    randoms.push_back(f);
  int64_t checked = 0;
  for (float scale : scales)
    for (const Range& r : ranges) {
      fgq::ActQuant q;
      const std::string err = fgq::make_act_quant(scale, r.zero, r.qmin, r.qmax, r.is_signed, &q);
      EXPECT(err.empty(), "make_act_quant: %s", err.c_str());
      std::vector<float> x = randoms;
      for (int k = r.qmin - r.zero - 3; k <= r.qmax - r.zero + 2; ++k)
        for (double edge : {k + 0.5, static_cast<double>(k)}) {
          const float center = static_cast<float>(edge * scale);
          if (!std::isfinite(center)) continue;
          float lo = center, hi = center;
          for (int u = 0; u < 48; ++u) {
            lo = std::nextafter(lo, -INFINITY);
            hi = std::nextafter(hi, INFINITY);
          }
          for (float f = lo; f <= hi; f = std::nextafter(f, INFINITY)) x.push_back(f);
        }
      std::vector<int8_t> want(x.size());
      for (size_t i = 0; i < x.size(); ++i) want[i] = fgq::quantize_one(x[i], q);
      const int64_t pixels = 61, channels = static_cast<int64_t>(x.size()) / pixels;
      for (const fgq::KernelDispatch* d : ps) {
        std::vector<int8_t> got(x.size());
        d->quantize(x.data(), static_cast<int64_t>(x.size()), q, got.data());
        const size_t i = first_difference(got, want);
        EXPECT(i == x.size(), "%s: quantize(%a) at scale %a = %d, quantize_one %d", d->name, x[i], scale, got[i],
               want[i]);
        std::vector<int8_t> nhwc(static_cast<size_t>(channels * pixels)), natural(nhwc.size());
        d->quantize_transposed(x.data(), channels, pixels, pixels, q, nhwc.data(), channels);
        for (int64_t c = 0; c < channels; ++c)
          for (int64_t p = 0; p < pixels; ++p)
            natural[static_cast<size_t>(c * pixels + p)] = nhwc[static_cast<size_t>(p * channels + c)];
        const size_t t = first_difference(natural, want);
        EXPECT(t == natural.size(), "%s: quantize_transposed(%a) at scale %a = %d, quantize_one %d", d->name,
               x[t], scale, natural[t], want[t]);
        checked += static_cast<int64_t>(x.size());
        // Short spans (one channel of a small map): the vector tails, and nothing written past them.
        for (int64_t count = 0; count <= 40; ++count) {
          std::vector<int8_t> span(static_cast<size_t>(count) + 16, 99);
          d->quantize(x.data() + 5, count, q, span.data());
          bool same = std::equal(span.begin(), span.begin() + count, want.begin() + 5);
          same = same && std::all_of(span.begin() + count, span.end(), [](int8_t v) { return v == 99; });
          EXPECT(same, "%s: quantize of a %ld-value span at scale %a", d->name, (long)count, scale);
        }
      }
    }
  std::printf("quantize: %ld values checked against quantize_one\n", (long)checked);
}

}  // namespace

int main() {
  const std::vector<const fgq::KernelDispatch*> ps = paths();
  test_rejects();
  test_golden(ps);
  test_random(ps);
  test_few_rows(ps);
  test_folded_extremes(ps);
  test_folded_tiles(ps);
  test_int8_weights(ps);
  test_dense_weights(ps);
  test_activation_slots(ps);
  test_quantize_exact(ps);
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("all kernel tests passed\n");
  return 0;
}
