// kernels.cpp as the module _kernels_avx512 (setup.py compiles it with the avx512 instruction set's
// flags). Each instruction set has a file of its own so that its object file is its own too: with
// one source for all three, parallel builds (build_ext -j) wrote one kernels.o at once.
#define RUNTIME_MODULE _kernels_avx512
#include "kernels.cpp"
