#!/bin/sh
# Build ggml's reference quantizers (src/ggml-quants.c alone) as libggmlq.so
# for bench/ and for regenerating the golden files in tests/data/ggml/.
# Usage: bench/ggml_ref/build.sh GGML_CHECKOUT   (a clone of ggml-org/ggml)
# Plain -O2 for the baseline x86-64/aarch64 target with -ffp-contract=off: no
# fused multiply-adds, so every float op rounds as the C source says.
# -DNDEBUG as llama.cpp's release builds: without it nearest_int's assert
# aborts on sub-blocks whose span is subnormal (Q4_K/Q5_K/Q2_K's iscale overflows).
set -eu
src=${1:?usage: build.sh GGML_CHECKOUT}
here=$(cd "$(dirname "$0")" && pwd)
cc=${CC:-cc}
"$cc" -O2 -DNDEBUG -ffp-contract=off -fPIC -shared \
    -I"$src/include" -I"$src/src" \
    "$src/src/ggml-quants.c" "$here/stubs.c" -o "$here/libggmlq.so" -lm
echo "built $here/libggmlq.so from $(git -C "$src" rev-parse HEAD 2>/dev/null || echo "$src")"
