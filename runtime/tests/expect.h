// The C++ test binaries' one check: EXPECT(cond, printf-style message) counts a failure and
// says where, without stopping, so one run lists every failing case. main() returns
// non-zero when g_failures > 0.
#pragma once

#include <cstdio>

inline int g_failures = 0;

#define EXPECT(cond, ...)                                       \
  do {                                                          \
    if (!(cond)) {                                              \
      ++g_failures;                                             \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
    }                                                           \
  } while (0)
