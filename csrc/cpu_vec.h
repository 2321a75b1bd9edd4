// at::vec for the kernels of csrc/ (include it before anything else): at::vec picks its SIMD width from
// CPU_CAPABILITY_*, which torch's own build sets per dispatch target; setup.py compiles with -march=native, so the
// width follows what the compiler was told it may use.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
