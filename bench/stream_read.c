/* STREAM-like read bandwidth: T threads sum a buffer much larger than the caches; prints the best GB/s of R passes.
 *
 *   gcc -O3 -march=native -ffast-math -fopenmp stream_read.c -o stream_read && ./stream_read THREADS [MiB] [PASSES]
 *
 * The baseline bench/side_by_side.py compares decode speed with: a decode token reads every weight once, so its
 * ceiling is this read rate. C with OpenMP, not Numba: a Numba float sum under-reads the bandwidth on some CPUs when
 * the machine is busy. Each thread first-touches its own part of the buffer, as the sum then reads it. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    int passes = argc > 3 ? atoi(argv[3]) : 5;
    if (threads < 1 || mib < 1 || passes < 1) {
        fprintf(stderr, "usage: stream_read THREADS [MiB] [PASSES]\n");
        return 2;
    }
    size_t n = mib * 1024 * 1024 / sizeof(float);
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) {
        fprintf(stderr, "cannot allocate %zu MiB\n", mib);
        return 1;
    }
    omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023) * 1e-3f;
    double best = 0.0, total = 0.0;
    for (int p = 0; p < passes; p++) {
        double t0 = now();
        float s = 0.0f;
#pragma omp parallel for schedule(static) reduction(+ : s)
        for (size_t i = 0; i < n; i++) s += a[i];
        double gbs = n * sizeof(float) / (now() - t0) / 1e9;
        total += s;
        if (gbs > best) best = gbs;
    }
    printf("%.2f GB/s (%d threads, %zu MiB, best of %d; checksum %g)\n", best, threads, mib, passes, total);
    free(a);
    return 0;
}
