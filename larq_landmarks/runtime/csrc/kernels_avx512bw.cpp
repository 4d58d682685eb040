// kernels.cpp as the module _kernels_avx512bw (setup.py compiles it with the avx512bw instruction
// set's flags: AVX-512 F/BW/VL/DQ, no VPOPCNTDQ). Each instruction set has a file of its own so that
// its object file is its own too.
#define RUNTIME_MODULE _kernels_avx512bw
#include "kernels.cpp"
