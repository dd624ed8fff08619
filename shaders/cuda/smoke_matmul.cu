// smoke_matmul.cu — a small shared-memory tiled FP32 matrix product C = A·B.
// It exists to exercise the whole path (NVRTC compile through the cache and
// archive, launch, event timing, download) on any CUDA GPU; it is not tuned.
//
// A [M, K], B [K, N], C [M, N], row-major float32. Grid (ceil(N/TILE), ceil(M/TILE)),
// block (TILE, TILE). Tails are masked, so any M, N, K work.
#ifndef TILE
#error "TILE must be defined (square tile edge in elements, e.g. 16)"
#endif
static_assert(TILE >= 4 && TILE <= 32, "TILE must be in 4..32: TILE*TILE threads per block must not exceed 1024");

extern "C" __global__ void smoke_matmul(const float* __restrict__ a, const float* __restrict__ b,
                                        float* __restrict__ c, int m, int n, int k) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE + 1];  // +1 column: the transposed read hits distinct banks
    const int row = blockIdx.y * TILE + threadIdx.y;
    const int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int t = 0; t < k; t += TILE) {
        const int ak = t + threadIdx.x;
        const int bk = t + threadIdx.y;
        as[threadIdx.y][threadIdx.x] = (row < m && ak < k) ? a[(long long)row * k + ak] : 0.0f;
        bs[threadIdx.y][threadIdx.x] = (bk < k && col < n) ? b[(long long)bk * n + col] : 0.0f;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < TILE; ++i) acc += as[threadIdx.y][i] * bs[i][threadIdx.x];
        __syncthreads();
    }
    if (row < m && col < n) c[(long long)row * n + col] = acc;
}
