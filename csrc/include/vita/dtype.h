// Host-side 16-bit float storage types and dtype dispatch for the CPU kernels.
// CPU kernels load/store 16-bit values and compute in float32.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vita/tensor.h"

namespace vita {

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(half_t x) {
  // IEEE binary16 -> binary32, exact, including subnormals, inf and NaN.
  uint32_t h = x.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  uint32_t out;
  if (exp == 0) {
    if (man == 0) {
      out = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      out = sign | (uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    out = sign | 0x7f800000u | (man << 13);
  } else {
    out = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return bits_to_float(out);
}

template <class T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline double from_float<double>(float f) {
  return f;
}
template <>
inline bf16_t from_float<bf16_t>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}
template <>
inline half_t from_float<half_t>(float f) {
  // binary32 -> binary16, round to nearest even, overflow to inf.
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520 -> inf
  if (a < 0x38800000u) {                                            // subnormal or zero in half
    // value * 2^24 rounded to nearest even integer gives the subnormal mantissa
    float v = bits_to_float(a) * 16777216.0f;
    uint32_t m = static_cast<uint32_t>(v);
    float r = v - float(m);
    if (r > 0.5f || (r == 0.5f && (m & 1u))) ++m;
    return half_t{uint16_t(sign | m)};
  }
  uint32_t mant = a & 0x7fffffu;
  uint32_t exp = (a >> 23) - 112u;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return half_t{uint16_t(sign | h)};
}

template <DType D>
struct CpuType;
template <>
struct CpuType<DType::kFloat32> {
  using type = float;
};
template <>
struct CpuType<DType::kFloat16> {
  using type = half_t;
};
template <>
struct CpuType<DType::kBFloat16> {
  using type = bf16_t;
};

// f receives std::integral_constant<DType, D>; backends map D to their element type.
template <class F>
decltype(auto) dispatch_float(DType d, const char* op, const char* arg, F&& f) {
  switch (d) {
    case DType::kFloat32:
      return f(std::integral_constant<DType, DType::kFloat32>{});
    case DType::kFloat16:
      return f(std::integral_constant<DType, DType::kFloat16>{});
    case DType::kBFloat16:
      return f(std::integral_constant<DType, DType::kBFloat16>{});
    default:
      Check{op}.type_error(std::string(arg) + " must be float32, float16 or bfloat16, got " + dtype_name(d));
  }
}

// Index tensors may be int32 or int64.
template <class F>
decltype(auto) dispatch_index(DType d, const char* op, const char* arg, F&& f) {
  switch (d) {
    case DType::kInt32:
      return f(int32_t{});
    case DType::kInt64:
      return f(int64_t{});
    default:
      Check{op}.type_error(std::string(arg) + " must be int32 or int64, got " + dtype_name(d));
  }
}

}  // namespace vita
