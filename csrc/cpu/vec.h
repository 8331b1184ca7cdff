// Fixed-width vectors for the CPU kernels: 64 bytes of accumulation type (16 floats or 8
// doubles) as GCC/Clang vector extensions, which the compiler maps onto whatever instruction set
// the including file targets (one zmm, two ymm or four xmm registers). Loads widen the storage
// type to the accumulation type; stores round back exactly as c10::Half / c10::BFloat16 do
// (round to nearest even), so a vector store writes the bits a scalar static_cast would.
//
// Included by bn_backward_stats_kernel.h inside its instruction-set namespace, once per build (so:
// no include guard), so every definition here is compiled for that instruction set only.
// It includes nothing itself (an #include inside a namespace would be wrong): the kernel header
// includes <cstdint>, <cstring> and the c10 Half/BFloat16 headers before its namespace opens.

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vectors only cross function boundaries inside this file's always-inlined helpers.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define GS_VEC_INLINE inline __attribute__((always_inline))

template <typename acc_t>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int kLanes = 16;
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int kLanes = 8;
};

typedef _Float16 vec16_half __attribute__((vector_size(32)));
typedef uint16_t vec16_u16 __attribute__((vector_size(32)));
typedef uint32_t vec16_u32 __attribute__((vector_size(64)));
typedef int32_t vec16_i32 __attribute__((vector_size(64)));

template <typename To, typename From>
GS_VEC_INLINE To bit_cast_vec(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_vec needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// An unaligned vector load of sizeof(V) bytes.
template <typename V>
GS_VEC_INLINE V load_bytes(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// Non-temporal store of N (32 or 64) bytes to N-aligned p: the write goes around the caches, so
// it costs no read-for-ownership of the line. For outputs too large to stay in cache anyway.
template <int N>
GS_VEC_INLINE void stream_bytes(void* p, const void* src) {
#if defined(__x86_64__) && GS_CPU_ISA_LEVEL >= 2
  if constexpr (N == 64) {
    _mm512_stream_si512(static_cast<__m512i*>(p), _mm512_loadu_si512(src));
    return;
  }
#endif
#if defined(__x86_64__) && GS_CPU_ISA_LEVEL >= 1
  for (int i = 0; i < N; i += 32) {
    _mm256_stream_si256(
        reinterpret_cast<__m256i*>(static_cast<char*>(p) + i),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const char*>(src) + i)));
  }
#elif defined(__x86_64__)
  for (int i = 0; i < N; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const char*>(src) + i)));
  }
#else
  std::memcpy(p, src, N);
#endif
}

// Orders streaming stores before what follows (other threads' reads after the parallel region).
GS_VEC_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Storage type <-> accumulation type, for kLanes consecutive values (vector) or one (scalar).
template <typename scalar_t>
struct Io;

// float and double are stored as they accumulate.
template <typename T>
struct IoSame {
  using acc_t = T;
  using vec = typename VecOf<T>::type;
  static GS_VEC_INLINE vec load(const T* p) { return load_bytes<vec>(p); }
  static GS_VEC_INLINE void store(T* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
  static GS_VEC_INLINE void store_stream(T* p, vec v) { stream_bytes<sizeof(vec)>(p, &v); }
  static GS_VEC_INLINE vec round(vec v) { return v; }
  static GS_VEC_INLINE T load1(const T* p) { return *p; }
  static GS_VEC_INLINE void store1(T* p, T v) { *p = v; }
  static GS_VEC_INLINE T round1(T v) { return v; }
};
template <>
struct Io<float> : IoSame<float> {};
template <>
struct Io<double> : IoSame<double> {};

// 16 halves <-> 16 floats. GCC turns __builtin_convertvector on _Float16 vectors into scalar
// conversions with lane inserts, so the AVX-512 and AVX2 builds use the F16C instructions
// directly; rounding to nearest even, like c10::Half. The baseline build (no F16C) keeps the
// portable form.
GS_VEC_INLINE VecOf<float>::type widen_half(const vec16_half& h) {
#if defined(__x86_64__) && GS_CPU_ISA_LEVEL >= 2
  // The zero-masked forms here and below: the same instructions (all lanes kept), without GCC
  // 12's "may be used uninitialized" warning on the unmasked intrinsics' undefined operand.
  return bit_cast_vec<VecOf<float>::type>(_mm512_maskz_cvtph_ps(0xFFFF, bit_cast_vec<__m256i>(h)));
#elif defined(__x86_64__) && GS_CPU_ISA_LEVEL >= 1
  const __m256i bits = bit_cast_vec<__m256i>(h);
  const __m256 halves[2] = {_mm256_cvtph_ps(_mm256_castsi256_si128(bits)),
                            _mm256_cvtph_ps(_mm256_extracti128_si256(bits, 1))};
  return bit_cast_vec<VecOf<float>::type>(halves);
#else
  return __builtin_convertvector(h, VecOf<float>::type);
#endif
}
GS_VEC_INLINE vec16_half narrow_half(VecOf<float>::type v) {
#if defined(__x86_64__) && GS_CPU_ISA_LEVEL >= 2
  return bit_cast_vec<vec16_half>(
      _mm512_maskz_cvtps_ph(0xFFFF, bit_cast_vec<__m512>(v), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__x86_64__) && GS_CPU_ISA_LEVEL >= 1
  __m256 floats[2];
  std::memcpy(floats, &v, sizeof(v));
  const __m128i lo = _mm256_cvtps_ph(floats[0], _MM_FROUND_TO_NEAREST_INT);
  const __m128i hi = _mm256_cvtps_ph(floats[1], _MM_FROUND_TO_NEAREST_INT);
  return bit_cast_vec<vec16_half>(_mm256_set_m128i(hi, lo));
#else
  return __builtin_convertvector(v, vec16_half);
#endif
}

template <>
struct Io<c10::Half> {
  using acc_t = float;
  using vec = VecOf<float>::type;
  static GS_VEC_INLINE vec load(const c10::Half* p) { return widen_half(load_bytes<vec16_half>(p)); }
  static GS_VEC_INLINE vec16_half narrow(vec v) { return narrow_half(v); }
  static GS_VEC_INLINE void store(c10::Half* p, vec v) {
    const vec16_half h = narrow(v);
    std::memcpy(p, &h, sizeof(h));
  }
  static GS_VEC_INLINE void store_stream(c10::Half* p, vec v) {
    const vec16_half h = narrow(v);
    stream_bytes<sizeof(h)>(p, &h);
  }
  static GS_VEC_INLINE vec round(vec v) { return widen_half(narrow(v)); }
  static GS_VEC_INLINE float load1(const c10::Half* p) { return static_cast<float>(*p); }
  static GS_VEC_INLINE void store1(c10::Half* p, float v) { *p = static_cast<c10::Half>(v); }
  static GS_VEC_INLINE float round1(float v) { return static_cast<float>(static_cast<c10::Half>(v)); }
};

template <>
struct Io<c10::BFloat16> {
  using acc_t = float;
  using vec = VecOf<float>::type;
  static GS_VEC_INLINE vec load(const c10::BFloat16* p) {
    const vec16_u16 bits = load_bytes<vec16_u16>(p);
    return bit_cast_vec<vec>(__builtin_convertvector(bits, vec16_u32) << 16);
  }
  // c10::BFloat16's rounding: to nearest even, any NaN to the quiet NaN 0x7FC0.
  static GS_VEC_INLINE vec16_u32 narrow_bits(vec v) {
    const vec16_u32 u = bit_cast_vec<vec16_u32>(v);
    const vec16_u32 rounded = (u + (0x7FFFu + ((u >> 16) & 1u))) >> 16;
    const vec16_u32 is_nan = bit_cast_vec<vec16_u32>(vec16_i32(v != v));
    return (rounded & ~is_nan) | (0x7FC0u & is_nan);
  }
  static GS_VEC_INLINE void store(c10::BFloat16* p, vec v) {
    const vec16_u16 b = __builtin_convertvector(narrow_bits(v), vec16_u16);
    std::memcpy(p, &b, sizeof(b));
  }
  static GS_VEC_INLINE void store_stream(c10::BFloat16* p, vec v) {
    const vec16_u16 b = __builtin_convertvector(narrow_bits(v), vec16_u16);
    stream_bytes<sizeof(b)>(p, &b);
  }
  static GS_VEC_INLINE vec round(vec v) { return bit_cast_vec<vec>(narrow_bits(v) << 16); }
  static GS_VEC_INLINE float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }
  static GS_VEC_INLINE void store1(c10::BFloat16* p, float v) { *p = static_cast<c10::BFloat16>(v); }
  static GS_VEC_INLINE float round1(float v) { return static_cast<float>(static_cast<c10::BFloat16>(v)); }
};
