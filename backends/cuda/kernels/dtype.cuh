// Element types: 16-bit float conversions through PTX (no cuda_fp16.h / cuda_bf16.h) and the
// kernels' element type `elem_t`, chosen by FA_DTYPE (0 f32, 1 f16, 2 bf16; src/variants.rs).
// Prepended: params.cuh.

DEV float bf16_to_f32(uint16_t x) { return __uint_as_float(((uint32_t)x) << 16); }
DEV float f16_to_f32(uint16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
DEV uint16_t f32_to_bf16(float f) {
    uint16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
DEV uint16_t f32_to_f16(float f) {
    uint16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
// Packs (lo, hi) into one register: lo in the low half (the lower column index).
DEV uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
DEV uint32_t pack_f16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

#ifndef FA_DTYPE
#error "FA_DTYPE comes from src/variants.rs"
#endif
#if FA_DTYPE == 0
typedef float elem_t;
DEV float load_elem(const elem_t* p, uint64_t i) { return p[i]; }
DEV void store_elem(elem_t* p, uint64_t i, float x) { p[i] = x; }
#else
typedef uint16_t elem_t;
DEV float load_elem(const elem_t* p, uint64_t i) {
#if FA_DTYPE == 1
    return f16_to_f32(p[i]);
#else
    return bf16_to_f32(p[i]);
#endif
}
DEV void store_elem(elem_t* p, uint64_t i, float x) {
#if FA_DTYPE == 1
    p[i] = f32_to_f16(x);
#else
    p[i] = f32_to_bf16(x);
#endif
}
#endif
