/* A decode step's decoder layers in one call: the same kernels the model's Python calls one by
 * one, called here in the same order on the same buffers.
 *
 * Driven from Python, a decode step of the small test model spends 2 ms of its 17 (64 sequences)
 * and 0.6 of its 2.9 (one) between the kernels: module calls, argument checks, allocations and
 * ctypes, while the OpenMP team's other thread spins at the region's end (measured,
 * docs/BENCHMARKS.md). Here the layers' ~10 kernels each run back to back, reading pointers laid
 * out once at start-up (weights, norms, caches) and once per step (the step's buffers). The
 * kernels are not linked in: the caller passes their addresses (Kernels), so each stays in its
 * own library with its own build flags and this file knows only their signatures.
 *
 * What a layer does is kernels/cpu_decode_layers.py's to decide (it takes only the decoders it
 * can run exactly as the Python would: a dense MLP, one of the layouts of norms below, at most two
 * RoPE tables); this file knows no model family.
 */
#include <stddef.h>
#include <stdint.h>

typedef int (*rows_fn)(const void *x, int64_t x_stride, int64_t M, const void *w, int64_t N,
                       int64_t K, int64_t Kp, const void *bias, void *out, int64_t out_stride,
                       int threads);
typedef void (*norm_fn)(const void *x, int64_t x_stride, const void *w, void *out, int64_t rows,
                        int64_t dim, float eps, int gemma, int threads);
typedef void (*norm_heads_fn)(void *x, int64_t token_stride, int64_t tokens, int64_t heads,
                              int64_t dim, const void *w, float eps, int gemma, int threads);
typedef void (*add_norm_fn)(const void *x, const void *h, const void *w, void *sum, void *out,
                            int64_t rows, int64_t dim, float eps, int gemma, int threads);
typedef void (*rope_fn)(void *x, int64_t token_stride, int64_t head_dim, int64_t tokens,
                        int64_t heads, int64_t half, const void *cos, const void *sin,
                        int64_t cs_stride, int threads);
typedef void (*silu_mul_fn)(const void *gate_up, int64_t stride, void *out, int64_t tokens,
                            int64_t inter, int threads);
typedef int (*gelu_tanh_mul_fn)(const void *gate_up, int64_t stride, void *out, int64_t tokens,
                                int64_t inter, const void *tanh16, int threads);
typedef void (*store_kv_fn)(const char *k, const char *v, int64_t src_stride, char *k_cache,
                            char *v_cache, const int64_t *slots, int64_t rows, int64_t row_bytes,
                            int threads);
typedef void (*decode_fn)(const void *q, int64_t q_stride, const void *k_cache,
                          const void *v_cache, const int32_t *tables, int64_t tables_stride,
                          const int32_t *lens, int64_t batch, int64_t heads, int64_t kv_heads,
                          int64_t dim, int64_t block_size, float scale, void *out, int threads,
                          int64_t window, float softcap, int q_bf16);

/* The kernels of one dtype (and of the step's row count, for the products). */
typedef struct {
    rows_fn rows;
    norm_fn norm;
    norm_heads_fn norm_heads;
    add_norm_fn add_norm;
    rope_fn rope;
    silu_mul_fn silu_mul;
    gelu_tanh_mul_fn gelu_tanh_mul; /* Gemma's GeGLU, with torch's vector tanh (tanh16) */
    const void *tanh16;
    store_kv_fn store_kv;
    decode_fn decode;
} Kernels;

/* A packed projection: N outputs of K inputs, blocks of Kp (kernels/cpu_linear.py). */
typedef struct {
    const void *w;
    int64_t n, k, kp;
    const void *bias; /* NULL: none */
} Proj;

typedef struct {
    const void *in_norm, *post_norm;
    const void *q_norm, *k_norm; /* per-head norms before RoPE (Qwen3, Gemma 3), or NULL */
    /* Gemma 2 and 3's sandwich: post_norm norms the attention's output before it joins the
     * stream, pre_ff_norm is the MLP's input norm, post_ff_norm norms the MLP's output; NULL
     * for a pre-norm layer (post_norm is then the MLP's input norm) */
    const void *pre_ff_norm, *post_ff_norm;
    Proj qkv, o, gate_up, down;
    void *k_cache, *v_cache;
    int64_t window; /* 0: the whole context */
    float softcap;  /* 0: none */
    float scale;
    int gelu_tanh; /* the MLP's activation: Gemma's tanh GELU, else SiLU */
    int rope;      /* which of the step's RoPE tables (Gemma 3's local layers have their own) */
} Layer;

/* What every layer shares. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, block_size, elem;
    float eps;
    int gemma;  /* Gemma's norms, y * (1 + w), every norm of the model */
    int q_bf16; /* the query (and attention output) in bfloat16 */
    int threads;
} Shape;

/* One step of `tokens` single-token sequences; x [tokens, hidden] is the residual stream, updated
 * in place as the Python layers do; pending [tokens, hidden] receives the last layer's MLP output
 * (the stream is x + pending). The rest is room for the layers' intermediates. */
typedef struct {
    int64_t tokens;
    void *x, *pending, *normed, *qkv, *attn, *h, *gate_up, *act;
    const void *cos[2], *sin[2];
    int64_t cs_stride, half;
    const int64_t *slots;
    const int32_t *tables;
    int64_t tables_stride;
    const int32_t *lens;
} Step;

/* Returns -1 when every layer ran, else the index of the layer whose product or GeGLU a kernel
 * declined (the caller checked that none would: the buffers are then partly updated, and it
 * must fail the step, not recompute it). */
int64_t decode_layers(const Kernels *kn, const Layer *layers, int64_t n_layers, const Shape *s,
                      const Step *st) {
    const int64_t T = st->tokens, H = s->hidden, I = s->inter, e = s->elem;
    const int64_t q_size = s->heads * s->head_dim, kv_size = s->kv_heads * s->head_dim;
    const int64_t qkv_n = q_size + 2 * kv_size;
    const int gm = s->gemma, th = s->threads;
    const float eps = s->eps;
    char *qkv = (char *)st->qkv;
    for (int64_t i = 0; i < n_layers; i++) {
        const Layer *L = &layers[i];
        if (i == 0)
            kn->norm(st->x, H, L->in_norm, st->normed, T, H, eps, gm, th);
        else
            kn->add_norm(st->x, st->pending, L->in_norm, st->x, st->normed, T, H, eps, gm, th);
        if (!kn->rows(st->normed, H, T, L->qkv.w, L->qkv.n, L->qkv.k, L->qkv.kp, L->qkv.bias, qkv,
                      qkv_n, th))
            return i;
        if (L->q_norm) {
            kn->norm_heads(qkv, qkv_n, T, s->heads, s->head_dim, L->q_norm, eps, gm, th);
            kn->norm_heads(qkv + q_size * e, qkv_n, T, s->kv_heads, s->head_dim, L->k_norm, eps,
                           gm, th);
        }
        kn->rope(qkv, qkv_n, s->head_dim, T, s->heads + s->kv_heads, st->half, st->cos[L->rope],
                 st->sin[L->rope], st->cs_stride, th);
        kn->store_kv(qkv + q_size * e, qkv + (q_size + kv_size) * e, qkv_n * e,
                     (char *)L->k_cache, (char *)L->v_cache, st->slots, T, kv_size * e, th);
        kn->decode(qkv, qkv_n, L->k_cache, L->v_cache, st->tables, st->tables_stride, st->lens, T,
                   s->heads, s->kv_heads, s->head_dim, s->block_size, L->scale, st->attn, th,
                   L->window, L->softcap, s->q_bf16);
        if (!kn->rows(st->attn, q_size, T, L->o.w, L->o.n, L->o.k, L->o.kp, L->o.bias, st->h, H,
                      th))
            return i;
        if (L->pre_ff_norm) { /* sandwich: the normed attention output joins the stream */
            kn->norm(st->h, H, L->post_norm, st->pending, T, H, eps, gm, th);
            kn->add_norm(st->x, st->pending, L->pre_ff_norm, st->x, st->normed, T, H, eps, gm,
                         th);
        } else {
            kn->add_norm(st->x, st->h, L->post_norm, st->x, st->normed, T, H, eps, gm, th);
        }
        if (!kn->rows(st->normed, H, T, L->gate_up.w, L->gate_up.n, L->gate_up.k, L->gate_up.kp,
                      L->gate_up.bias, st->gate_up, 2 * I, th))
            return i;
        if (L->gelu_tanh) {
            if (!kn->gelu_tanh_mul(st->gate_up, 2 * I, st->act, T, I, kn->tanh16, th)) return i;
        } else {
            kn->silu_mul(st->gate_up, 2 * I, st->act, T, I, th);
        }
        void *mlp_out = L->post_ff_norm ? st->h : st->pending;
        if (!kn->rows(st->act, I, T, L->down.w, L->down.n, L->down.k, L->down.kp, L->down.bias,
                      mlp_out, H, th))
            return i;
        if (L->post_ff_norm) kn->norm(st->h, H, L->post_ff_norm, st->pending, T, H, eps, gm, th);
    }
    return -1;
}
