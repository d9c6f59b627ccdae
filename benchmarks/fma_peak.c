/* The CPU's fp32 peak, measured: fused multiply-adds per second on N threads, and the clock.
 *
 * bench_trainer.py compiles this with `cc -O3 -march=native -pthread` and runs it, because
 * /proc/cpuinfo cannot give the peak on every machine: a VM reports the base (TSC) clock, not the
 * one the cores run at, and a core may accept 512-bit instructions yet execute them on 256-bit units
 * (AMD Zen 4), so the ISA flags overstate the width. Each thread runs CHAINS independent FMA chains
 * on the widest vectors the compiler targets (enough chains to cover the FMA latency on two pipes),
 * so the loop is bound by FMA throughput alone. The clock comes from a chain of dependent integer
 * adds, one per cycle on every x86 core since the Pentium 4.
 *
 *   fma_peak THREADS  ->  {"threads": T, "gflops": G, "clock_ghz": C, "vector_bits": B}
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHAINS 12
#define ROUNDS 20000000L /* per thread: 12 x 20M FMAs, about 0.1-0.3 s on a 2020s core */

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define FIRST(v) _mm512_cvtss_f32(v)
#elif defined(__FMA__)
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define FIRST(v) _mm256_cvtss_f32(v)
#else
#error "needs FMA (x86-64 with AVX2/FMA or AVX-512)"
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *fma_chains(void *out) {
    vec acc[CHAINS];
    vec scale = SET1(0.999999f), shift = SET1(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = SET1((float)i);
    for (long r = 0; r < ROUNDS; r++)
        for (int i = 0; i < CHAINS; i++) acc[i] = FMA(acc[i], scale, shift);
    float sum = 0; /* keeps the chains live */
    for (int i = 0; i < CHAINS; i++) sum += FIRST(acc[i]);
    *(float *)out = sum;
    return NULL;
}

static double clock_ghz(void) {
    long x = 0, adds = 400000000L;
    double start = now();
    for (long k = 0; k < adds / 4; k++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    return adds / (now() - start) / 1e9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 1024) return 2;
    pthread_t *ids = malloc(sizeof(pthread_t) * threads);
    float *sums = malloc(sizeof(float) * threads);
    double start = now();
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, fma_chains, &sums[t]);
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    double seconds = now() - start;
    double flops = 2.0 * LANES * CHAINS * (double)ROUNDS * threads;
    printf("{\"threads\": %d, \"gflops\": %.1f, \"clock_ghz\": %.3f, \"vector_bits\": %d, \"check\": %g}\n",
           threads, flops / seconds / 1e9, clock_ghz(), LANES * 32, (double)sums[0]);
    return 0;
}
