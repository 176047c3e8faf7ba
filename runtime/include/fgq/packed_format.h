// The packed 2-bit ternary format (docs/packed-format.md), mirrored from
// fgq_onnx/packing.py. Four 2-bit two's-complement codes a byte, the first in
// the least significant bits; 0 -> 00, +1 -> 01, -1 -> 11, 10 is invalid.
#pragma once

#include <cstdint>

namespace fgq {
namespace packed {

constexpr unsigned kBitsPerCode = 2;
constexpr unsigned kCodesPerByte = 8 / kBitsPerCode;
constexpr uint8_t kCodeZero = 0b00;
constexpr uint8_t kCodePlus = 0b01;
constexpr uint8_t kCodeMinus = 0b11;
constexpr uint8_t kCodeInvalid = 0b10;

static_assert(kCodesPerByte == 4, "four codes a byte");
static_assert((static_cast<uint8_t>(static_cast<int8_t>(-1)) & 0b11) == kCodeMinus,
              "codes are the low two bits of the int8 value (ONNX INT2)");
static_assert((static_cast<uint8_t>(static_cast<int8_t>(1)) & 0b11) == kCodePlus, "");

// The code at position i of a packed row.
inline uint8_t code_at(const uint8_t* row, uint64_t i) {
  return static_cast<uint8_t>((row[i / kCodesPerByte] >> (kBitsPerCode * (i % kCodesPerByte))) & 0b11);
}

// Ternary value of a valid code (kCodeInvalid must be rejected before).
inline int decode(uint8_t code) { return code == kCodeZero ? 0 : (code == kCodePlus ? 1 : -1); }

// Bytes of a packed row of `codes` codes.
constexpr uint64_t row_bytes(uint64_t codes) { return (codes + kCodesPerByte - 1) / kCodesPerByte; }

}  // namespace packed
}  // namespace fgq
