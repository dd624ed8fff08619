// read_ceiling.cu — a pure read of device memory: the bandwidth ceiling of a decode step.
//
// Every thread streams 16-byte vectors (ld.global.nc with L1::no_allocate: read once, never
// cached in L1) in a grid-stride loop, UNROLL loads in flight, and folds them into an XOR that
// is stored only if it equals `sentinel` (never, for data the host fills: the loads cannot be
// removed and nothing else is written). Prototype 3 divides the decode kernels' K + V bytes per
// second by the best of a few grid sizes of this kernel.
//
// Launch: any grid and block; arguments (src, n16 = 16-byte vectors in src, sentinel, sink).
// Constant: UNROLL (loads per thread per loop trip).
#ifndef UNROLL
#error "UNROLL must be defined"
#endif
static_assert(UNROLL >= 1 && UNROLL <= 16, "UNROLL must be in [1, 16]");

struct V4 {
    unsigned x, y, z, w;
};

__device__ __forceinline__ V4 load_stream(const V4* p) {
    V4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

extern "C" __global__ void read_ceiling(const V4* __restrict__ src, unsigned long long n16, unsigned sentinel,
                                        unsigned* __restrict__ sink) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (; i + (UNROLL - 1) * stride < n16; i += UNROLL * stride) {
        V4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = load_stream(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) {
        const V4 v = load_stream(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == sentinel) sink[0] = acc;
}
