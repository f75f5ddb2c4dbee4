/* The four ggml.c functions ggml-quants.c calls, so that it links alone. */
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    (void)fmt;
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}

static void block_of(enum ggml_type type, size_t * n, size_t * bytes) {
    switch (type) {
        case GGML_TYPE_Q4_0: *n = 32; *bytes = 18; return;
        case GGML_TYPE_Q4_1: *n = 32; *bytes = 20; return;
        case GGML_TYPE_Q5_0: *n = 32; *bytes = 22; return;
        case GGML_TYPE_Q5_1: *n = 32; *bytes = 24; return;
        case GGML_TYPE_Q8_0: *n = 32; *bytes = 34; return;
        case GGML_TYPE_Q2_K: *n = 256; *bytes = 84; return;
        case GGML_TYPE_Q3_K: *n = 256; *bytes = 110; return;
        case GGML_TYPE_Q4_K: *n = 256; *bytes = 144; return;
        case GGML_TYPE_Q5_K: *n = 256; *bytes = 176; return;
        case GGML_TYPE_Q6_K: *n = 256; *bytes = 210; return;
        default: fprintf(stderr, "stubs.c: type %d not handled\n", (int)type); abort();
    }
}

size_t ggml_row_size(enum ggml_type type, int64_t ne) {
    size_t n, bytes;
    block_of(type, &n, &bytes);
    return bytes * (size_t)ne / n;
}

size_t ggml_type_size(enum ggml_type type) {
    size_t n, bytes;
    block_of(type, &n, &bytes);
    return bytes;
}

const char * ggml_type_name(enum ggml_type type) { (void)type; return "?"; }
