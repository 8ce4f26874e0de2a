/* The query rows of one prefill-attention task and the keys each sees, shared by extend_f32.c
 * and extend_avx512bf16.c (the includer defines ROWS, PASS and MAX_DIM). A task is one KV head
 * and up to ROWS * PASS consecutive rows of the chunk's (token, head of the group) rows: row i
 * is token i / group, query head kvh * group + i % group, so a GQA group reads each key once. */
#ifndef PAGEWIRE_EXTEND_ROWS_H
#define PAGEWIRE_EXTEND_ROWS_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* ROWS rows and their running state (online softmax, output accumulators in float32). */
typedef struct {
    int64_t at[ROWS];  /* each row's query: its element offset in q */
    int64_t lo[ROWS], hi[ROWS], first, last; /* row r sees keys [lo, hi); the block, [first, last) */
    float run_max[ROWS], run_sum[ROWS], alpha[ROWS];
    float acc[ROWS * MAX_DIM];
} RowBlock;

/* Element offset of task row i (of KV head kvh) in a [tokens, heads, dim] tensor. */
static inline int64_t row_at(int64_t i, int64_t stride, int64_t kvh, int64_t group, int64_t dim) {
    return i / group * stride + (kvh * group + i % group) * dim;
}

static void start_rows(RowBlock *b, int64_t q_stride, int64_t r0, int rows, int64_t kvh,
                       int64_t group, int64_t len, int64_t q_offset, int64_t window, int64_t dim) {
    b->first = len, b->last = 0;
    for (int r = 0; r < ROWS; r++) {
        const int64_t i = r0 + (r < rows ? r : rows - 1);  /* spare rows repeat the last */
        const int64_t pos = q_offset + i / group;
        b->at[r] = row_at(i, q_stride, kvh, group, dim);
        b->hi[r] = pos + 1 < len ? pos + 1 : len;
        b->lo[r] = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
        b->first = b->lo[r] < b->first ? b->lo[r] : b->first;
        b->last = b->hi[r] > b->last ? b->hi[r] : b->last;
        b->run_max[r] = -INFINITY, b->run_sum[r] = 0.0f;
    }
    memset(b->acc, 0, ROWS * dim * 4);
}

/* A task's rows [r0, r0 + rows) as blocks of ROWS (how many it took); [*first, *last): the keys
 * any of them sees. */
static int start_task(RowBlock blocks[PASS], int64_t q_stride, int64_t r0, int64_t rows,
                      int64_t kvh, int64_t group, int64_t len, int64_t q_offset, int64_t window,
                      int64_t dim, int64_t *first, int64_t *last) {
    const int nb = (int)((rows + ROWS - 1) / ROWS);
    *first = len, *last = 0;
    for (int b = 0; b < nb; b++) {
        const int n = (int)(rows - ROWS * b < ROWS ? rows - ROWS * b : ROWS);
        start_rows(&blocks[b], q_stride, r0 + ROWS * b, n, kvh, group, len, q_offset, window, dim);
        *first = blocks[b].first < *first ? blocks[b].first : *first;
        *last = blocks[b].last > *last ? blocks[b].last : *last;
    }
    return nb;
}

/* Whether block b takes part in the key block [k0, k0 + kb). */
static inline int sees(const RowBlock *b, int64_t k0, int64_t kb) {
    return k0 < b->last && k0 + kb > b->first;
}
#endif
