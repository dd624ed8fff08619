// smoke.metal — the smallest kernel that proves the Metal path end to end (library load,
// pipeline, buffers, dispatch, read-back): y[i] = alpha * x[i] + y[i] for i < n.
// Launch: n threads in any 1D threadgroup shape; out-of-range threads return.
#include <metal_stdlib>
#include "metal_bindings.h"

using namespace metal;

kernel void smoke(device const float* x [[buffer(ATTNPROTO_BUF_SMOKE_X)]],
                  device float* y [[buffer(ATTNPROTO_BUF_SMOKE_Y)]],
                  constant float& alpha [[buffer(ATTNPROTO_BUF_SMOKE_ALPHA)]],
                  constant uint& n [[buffer(ATTNPROTO_BUF_SMOKE_N)]],
                  uint i [[thread_position_in_grid]])
{
    if (i >= n) {
        return;
    }
    y[i] = fma(alpha, x[i], y[i]);
}
