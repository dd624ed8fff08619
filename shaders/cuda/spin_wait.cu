// spin_wait.cu — keeps the GPU busy for a given time (the timing guard).
//
// Backend::time() launches it (one thread) before each start event when a
// guard is requested, so that the host's launch overhead for the timed work
// (Python dispatch of an anchor, argument packing) overlaps with GPU work
// instead of appearing as idle time between the start event and the kernel.
extern "C" __global__ void spin_wait(unsigned long long ns) {
    unsigned long long start;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    for (;;) {
        unsigned long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (now - start >= ns) break;
    }
}
