// The bit-packed runtime's CUDA kernels, compiled at run time by NVRTC through CuPy's RawModule
// (larq_landmarks/runtime/cuda.py); no TensorFlow and no build step. Semantics are those of the
// C++ kernels beside this file (kernels.cpp) and of LCE's ops: bit set = negative, padding bits
// 0, accumulator = XOR popcount, float output float(clamp(2 * acc)) * multiplier + bias (the
// product rounded before the bias is added, as LCE's kernels and the C++ ones compute it),
// bit-packed output acc > threshold.
//
// The binary convolution is an implicit GEMM: rows are output pixels, columns output channels,
// K the taps x input words of each pixel (tap-major, padded to 256 bits). Tensor cores on sm_80+
// only have the AND form of the 1-bit MMA on Hopper, so each block counts popc(a & w) and the
// epilogue forms the XOR count as popc(a) + popc(w) - 2 popc(a & w), with popc(a) counted while
// the block loads its rows and popc(w) once when the weights are prepared.
// runtime/cuda_tiles.py is a NumPy model of exactly this indexing (the 128-row tiles), tested on the
// CPU; the whole kernel, every tile, runs on the CPU in the tests too (tests/cuda_on_cpu.py).

typedef unsigned int u32;
typedef unsigned char u8;
typedef long long i64;

#define BM 128     // output pixels per block (the small grids' kernels: 64 or 32, their kRows)
#define BN 64      // output channels per block
#define KW 8       // 32-bit words per K step (256 bits, one m16n8k256 MMA)
#define KC 40      // K words loaded per chunk (5 MMA steps) by the 128-row tiles; the small tiles take 2 KC
#define THREADS 256
#ifndef BCONV_MIN_BLOCKS
#define BCONV_MIN_BLOCKS 4  // blocks per SM the registers must allow (64 registers, no spills on sm_90)
#endif
#ifndef BCONV_STEPPED_GATHER
#define BCONV_STEPPED_GATHER 0  // 1: gather_row_stepped loads the rows (cuda.py's stepped_gather), else gather_row
#endif

// An output pixel's batch index, row and column (pixels numbered image by image, row by row).
struct Pixel {
  int b, y, x;
};
__device__ __forceinline__ Pixel pixel_position(i64 pixel, int out_h, int out_w) {
  const int b = (int)(pixel / ((i64)out_h * out_w));
  const int rest = (int)(pixel - (i64)b * out_h * out_w);
  const int y = rest / out_w;
  return Pixel{b, y, rest - y * out_w};
}

// Element idx of an NHWC output: its pixel's batch index, row and column, and its channel.
struct Element {
  int b, y, x, c;
};
__device__ __forceinline__ Element element_position(i64 idx, int channels, int out_h, int out_w) {
  const i64 pixel = idx / channels;
  const Pixel p = pixel_position(pixel, out_h, out_w);
  return Element{p.b, p.y, p.x, (int)(idx - pixel * channels)};
}

// TFLite's activation clamp, std::min(std::max(v, lo), hi): NaN passes through (fminf/fmaxf would
// turn it into a bound).
__device__ __forceinline__ float clamp_as_tflite(float v, float lo, float hi) {
  const float low = v < lo ? lo : v;
  return hi < low ? hi : low;
}

// 16-byte loads and stores (the address must be 16-byte aligned on the GPU; the tests' CPU build checks it).
__device__ __forceinline__ float4 load_float4(const float* p) {
#if defined(LARQ_LANDMARKS_CUDA_ON_CPU)
  cuda_on_cpu_check_aligned(p, 16, "float4 load");
#endif
  return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ void store_float4(float* p, float4 v) {
#if defined(LARQ_LANDMARKS_CUDA_ON_CPU)
  cuda_on_cpu_check_aligned(p, 16, "float4 store");
#endif
  *reinterpret_cast<float4*>(p) = v;
}

__device__ __forceinline__ uint4 load_uint4(const u32* p) {
#if defined(LARQ_LANDMARKS_CUDA_ON_CPU)
  cuda_on_cpu_check_aligned(p, 16, "uint4 load");
#endif
  return *reinterpret_cast<const uint4*>(p);
}

__device__ __forceinline__ void store_uint2(u32* p, u32 x, u32 y) {
#if defined(LARQ_LANDMARKS_CUDA_ON_CPU)
  cuda_on_cpu_check_aligned(p, 8, "uint2 store");
#endif
  uint2 v;
  v.x = x, v.y = y;
  *reinterpret_cast<uint2*>(p) = v;
}

// V floats from p into v (V = 4: one 16-byte load) and back.
template <int V>
__device__ __forceinline__ void load_floats(const float* p, float* v) {
  if (V == 4) {
    const float4 f = load_float4(p);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = p[j];
  }
}

template <int V>
__device__ __forceinline__ void store_floats(float* p, const float* v) {
  if (V == 4) {
    store_float4(p, make_float4(v[0], v[1], v[2], v[3]));
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = v[j];
  }
}

// A word of bits from 8 neighbouring lanes' 4-bit pieces (lane l's `nibble` is bits 4 (l % 8) on):
// every lane of the warp must call it (the shuffles take the whole warp); lanes l % 8 == 0 hold it.
__device__ __forceinline__ u32 word_of_nibbles(u32 nibble) {
  u32 word = nibble << (4 * (threadIdx.x & 7));
  word |= __shfl_xor_sync(0xffffffffu, word, 1);
  word |= __shfl_xor_sync(0xffffffffu, word, 2);
  word |= __shfl_xor_sync(0xffffffffu, word, 4);
  return word;
}

// LceQuantize's bit of a float v in channel c: (v * scale[c] + shift[c]) < 0, each optional,
// rounded as separate ops (bitpack's, and the passes that pack the bits of the op they end).
__device__ __forceinline__ bool quantized_bit(float v, const float* scale, const float* shift, int has_scale,
                                              int has_shift, int c) {
  if (has_scale) v = __fmul_rn(v, scale[c]);
  if (has_shift) v = __fadd_rn(v, shift[c]);
  return v < 0.0f;
}

// LceQuantize: bit c of pixel p = (x * scale + shift) < 0, rounded as separate ops. One thread per
// (pixel, channel), a warp's ballot is one output word.
extern "C" __global__ void bitpack(const float* x, const float* scale, const float* shift, int has_scale,
                                   int has_shift, i64 pixels, int channels, int words, int* out) {
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 word = idx >> 5;
  const int lane = threadIdx.x & 31;
  const i64 pixel = word / words;
  const int c = (int)(word - pixel * words) * 32 + lane;
  bool bit = false;
  if (pixel < pixels && c < channels)
    bit = quantized_bit(x[pixel * channels + c], scale, shift, has_scale, has_shift, c);
  const u32 ballot = __ballot_sync(0xffffffffu, bit);
  if (lane == 0 && pixel < pixels) out[word] = (int)ballot;
}

// bitpack with 4 channels a thread (channels % 4 == 0, x 16-byte aligned): one 16-byte load each,
// 8 threads a word (the last word's threads past the channels idle), their pieces ORed by shuffles.
extern "C" __global__ void bitpack_float4(const float* x, const float* scale, const float* shift, int has_scale,
                                          int has_shift, i64 pixels, int channels, int words, int* out) {
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 pixel = idx / (8 * words);
  const int c = 4 * (int)(idx - pixel * 8 * words);
  u32 nibble = 0;
  if (pixel < pixels && c < channels) {
    float v[4];
    load_floats<4>(x + pixel * channels + c, v);
#pragma unroll
    for (int j = 0; j < 4; ++j) nibble |= (u32)quantized_bit(v[j], scale, shift, has_scale, has_shift, c + j) << j;
  }
  const u32 word = word_of_nibbles(nibble);
  if ((threadIdx.x & 7) == 0 && pixel < pixels && c < channels) out[pixel * words + c / 32] = (int)word;
}

// LceDequantize: +1 / -1 floats.
extern "C" __global__ void unpack(const u32* x, i64 pixels, int channels, int words, float* out) {
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= pixels * channels) return;
  const i64 pixel = idx / channels;
  const int c = (int)(idx - pixel * channels);
  out[idx] = ((x[pixel * words + (c >> 5)] >> (c & 31)) & 1u) ? -1.0f : 1.0f;
}

__device__ __forceinline__ void mma_and_popc(int* c, const u32* a, u32 b0, u32 b1) {
#if defined(LARQ_LANDMARKS_CUDA_ON_CPU)
  cuda_on_cpu_mma_m16n8k256_and_popc(c, a, b0, b1);  // the tests' CPU build (tests/cuda_on_cpu.h)
#elif __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// A global -> shared copy that holds no register and does not wait for its data (cp.async, sm_80
// and newer: the tensor-core path's GPUs), so that all of a chunk's loads are in flight at once;
// `valid` false writes zeros instead of reading. The data is there after the thread's next
// copy_async_wait().
template <int kBytes>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
#if defined(LARQ_LANDMARKS_CUDA_ON_CPU)
  cuda_on_cpu_copy_async(dst, src, kBytes, valid ? kBytes : 0);  // the tests' CPU build: done at the wait
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"((u32)__cvta_generic_to_shared(dst)),
               "l"(src), "n"(kBytes), "r"(valid ? kBytes : 0)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void copy_async_wait() {
#if defined(LARQ_LANDMARKS_CUDA_ON_CPU)
  cuda_on_cpu_copy_async_wait();
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

struct BconvArgs {
  const u32* x;            // [N, H, W, words] bit-packed input
  const u32* w;            // [Cout padded to BN, k_stride] weights, K = tap-major, zero padded to KC words
  const int* weight_pop;   // [Cout padded] set bits per output channel (all taps)
  const int* tap_pop;      // [taps, Cout] set bits per tap and channel (zero-padding correction)
  const float* multiplier; // [Cout] float output: out = float(clamp(2 acc)) * multiplier + bias
  const float* bias;
  const int* thresholds;   // [Cout] bit-packed output: bit = acc > threshold
  void* out;               // float output: channels out_offset .. + Cout of rows out_stride apart (a part of
  const float* residual;   // a channel CONCATENATION), plus the residual there where has_residual (its ADD)
  u32* next_bits;          // pack_next: [pixels, ceil(Cout / 32)] the bits of the LceQuantize reading the
  const float* next_scale; // float output, bit = out * next_scale + next_shift < 0 (each optional,
  const float* next_shift; // has_next_scale / has_next_shift), rounded as the separate ops round
  int batch, height, width, words, out_h, out_w, channels_in, channels_out;
  int filter_h, filter_w, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left, pad_value;
  int k_words, k_stride, clamp_min, clamp_max, packed_output, pack_next, has_next_scale, has_next_shift;
  int out_stride, out_offset, has_residual;
};

// A block's per-channel constants (column j is channel n0 + j; zero past the last channel), copied
// to shared memory with the first K chunk, so that the epilogue finds them there instead of
// waiting for global loads after the MMAs.
struct BconvConstants {
  int weight_pop[BN];
  float multiplier[BN];  // float output
  float bias[BN];
  int threshold[BN];     // bit-packed output
  float next_scale[BN];  // pack_next, each where given
  float next_shift[BN];
};

// One 4-byte word to shared memory: by cp.async (kAsyncCopies) or through a register; zero where
// `valid` is false (src is then not read).
template <bool kAsyncCopies>
__device__ __forceinline__ void copy_word(void* dst, const void* src, bool valid) {
  if (kAsyncCopies)
    copy_async<4>(dst, src, valid);
  else
    *static_cast<u32*>(dst) = valid ? *static_cast<const u32*>(src) : 0u;
}

// Thread j < BN copies column j's constants (the copies are in after the thread's first wait).
template <bool kAsyncCopies>
__device__ __forceinline__ void copy_constants(const BconvArgs& g, BconvConstants& k, int n0) {
  const int j = threadIdx.x;
  if (j >= BN) return;
  const bool real = n0 + j < g.channels_out;
  const int c = real ? n0 + j : 0;
  copy_word<kAsyncCopies>(&k.weight_pop[j], g.weight_pop + c, real);
  if (g.packed_output) {
    copy_word<kAsyncCopies>(&k.threshold[j], g.thresholds + c, real);
    return;
  }
  copy_word<kAsyncCopies>(&k.multiplier[j], g.multiplier + c, real);
  copy_word<kAsyncCopies>(&k.bias[j], g.bias + c, real);
  if (g.has_next_scale) copy_word<kAsyncCopies>(&k.next_scale[j], g.next_scale + c, real);
  if (g.has_next_shift) copy_word<kAsyncCopies>(&k.next_shift[j], g.next_shift + c, real);
}

// The bit the next layer's LceQuantize packs for column j's float output v (its batch norm folded in).
__device__ __forceinline__ bool next_bit(const BconvArgs& g, const BconvConstants& k, float v, int j) {
  return quantized_bit(v, k.next_scale, k.next_shift, g.has_next_scale, g.has_next_shift, j);
}

// The taps of the pixel whose top-left input is (y0, x0) that lie outside the image: bit
// fy * filter_w + fx.
__device__ __forceinline__ unsigned long long outside_taps(const BconvArgs& g, int y0, int x0) {
  unsigned long long outside = 0;
  for (int fy = 0; fy < g.filter_h; ++fy)
    for (int fx = 0; fx < g.filter_w; ++fx) {
      const int y = y0 + fy * g.dilation_h, x = x0 + fx * g.dilation_w;
      if (y < 0 || y >= g.height || x < 0 || x >= g.width) outside |= 1ull << (fy * g.filter_w + fx);
    }
  return outside;
}

// kVector (1, 2 or 4) consecutive words, from global memory to shared memory in one load and one
// store (both aligned to their size), or zeros where `valid` is false (src is then not read).
// Returns their set bits (the register loads'; cp.async's are counted after its wait).
template <int kVector, bool kAsyncCopies>
__device__ __forceinline__ int copy_row_words(u32* dst, const u32* src, bool valid) {
  if (kAsyncCopies) {
    copy_async<4 * kVector>(dst, src, valid);
    return 0;
  }
  if constexpr (kVector == 1) {
    const u32 v = valid ? *src : 0u;
    *dst = v;
    return __popc(v);
  } else {
#if defined(LARQ_LANDMARKS_CUDA_ON_CPU)
    cuda_on_cpu_check_aligned(dst, 4 * kVector, "vector store");
    if (valid) cuda_on_cpu_check_aligned(src, 4 * kVector, "vector load");
#endif
    if constexpr (kVector == 2) {
      uint2 v = {0u, 0u};
      if (valid) v = *reinterpret_cast<const uint2*>(src);
      *reinterpret_cast<uint2*>(dst) = v;
      return __popc(v.x) + __popc(v.y);
    } else {
      uint4 v = {0u, 0u, 0u, 0u};
      if (valid) v = *reinterpret_cast<const uint4*>(src);
      *reinterpret_cast<uint4*>(dst) = v;
      return __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w);
    }
  }
}

// A row's K words k0 .. k0 + share - 1 (tap-major: tap k / words, word k % words of the pixel the
// tap reads) into dst, one word at a time, its address computed from the tap for each; zeros for
// taps outside the image and past k_words. Steps through the taps without division. Adds the set
// bits loaded to `pop` (register loads).
template <bool kAsyncCopies>
__device__ __forceinline__ void gather_row(const BconvArgs& g, u32* dst, int b, int y0, int x0, bool row_valid,
                                           int k0, int share, int& pop) {
  int tap = k0 / g.words, word = k0 - tap * g.words;
  int fy = tap / g.filter_w, fx = tap - fy * g.filter_w;
#pragma unroll 4
  for (int j = 0; j < share; ++j) {
    const int y = y0 + fy * g.dilation_h, x = x0 + fx * g.dilation_w;
    const bool inside = row_valid && k0 + j < g.k_words && y >= 0 && y < g.height && x >= 0 && x < g.width;
    const u32* src = g.x + (inside ? (((i64)b * g.height + y) * g.width + x) * g.words + word : 0);
    pop += copy_row_words<1, kAsyncCopies>(dst + j, src, inside);
    if (++word == g.words) {
      word = 0;
      if (++fx == g.filter_w) fx = 0, ++fy;
    }
  }
}

// gather_row kVector words at a time, the source address stepped along K instead of computed for
// each word, and the tap's place in the image checked once a tap: a tap's words lie together in the
// input, so where words, share (and so k0: chunks are multiples of 4 words) are multiples of kVector, each
// vector is words of one tap, all inside the image or all outside, all below k_words or all past
// it. `src` may point outside the input while its tap is outside the image or past K; it is then
// not read (a safe address goes to the copy instead).
template <int kVector, bool kAsyncCopies>
__device__ __forceinline__ void gather_row_stepped(const BconvArgs& g, u32* dst, int b, int y0, int x0,
                                                   bool row_valid, int k0, int share, int& pop) {
  int tap = k0 / g.words, word = k0 - tap * g.words;
  const int fy = tap / g.filter_w;
  int y = y0 + fy * g.dilation_h, x = x0 + (tap - fy * g.filter_w) * g.dilation_w;  // the tap's input pixel
  const u32* src = g.x + (((i64)b * g.height + y) * g.width + x) * g.words + word;
  const int real = g.k_words - k0;  // words of the share below k_words
  bool inside = row_valid && (unsigned)y < (unsigned)g.height && (unsigned)x < (unsigned)g.width;
#pragma unroll 4
  for (int j = 0; j < share; j += kVector) {
    const bool valid = inside && j < real;
    pop += copy_row_words<kVector, kAsyncCopies>(dst + j, valid ? src : g.x, valid);
    src += kVector;
    word += kVector;
    if (word == g.words) {
      word = 0;
      src += (g.dilation_w - 1) * g.words;  // from past a tap's last word to the next tap's first
      x += g.dilation_w;
      if (x == x0 + g.filter_w * g.dilation_w) {  // past the filter row's last tap: to the next row's first
        src += (g.dilation_h * g.width - g.filter_w * g.dilation_w) * g.words;
        x = x0;
        y += g.dilation_h;
      }
      inside = row_valid && (unsigned)y < (unsigned)g.height && (unsigned)x < (unsigned)g.width;
    }
  }
}

// The block's AND counts in shared memory (the MMAs' accumulators, for the epilogue): rows
// BCONV_COUNT_STRIDE words apart. 72 (8 mod 32): the MMA fragments' pairs (rows g, columns 2t and 2t + 1
// of 8 rows x 8 columns) go in by 8-byte stores that fall on 32 different banks a half warp, and the
// float epilogue reads a thread's 4 counts in one 16-byte load, 8 threads of a row a quarter warp
// (with 65 words a row the stores met 4-way and the 4-byte reads 2-way bank conflicts).
#define BCONV_COUNT_STRIDE (BN + 8)

// The A and B tiles of one K chunk (rows kStride words apart), and afterwards the block's
// accumulators, share the memory. The weight words and the stepped gather's go in by up to 16-byte
// copies: a union of 4-byte words is only 4-byte aligned by itself (`.shared .align 4` in the PTX),
// so its alignment is asked for, and the rows are whole 16-byte units.
template <int kRows, int kStride>
union __align__(16) BconvShared {
  static_assert(kStride % 4 == 0 && (kStride / 4) % 2 == 1, "rows of an odd number of 16-byte units");
  static_assert(BCONV_COUNT_STRIDE % 32 == 8, "count rows 8 banks apart");
  struct {
    u32 a[kRows * kStride];
    u32 b[BN * kStride];
  } tiles;
  int c[kRows * BCONV_COUNT_STRIDE];
};

// The popcount path's counting: thread (tr, tc) adds popc(a & w) over `k_words` words for rows
// tr + 16 i and columns tc + 16 j, j below kColumnGroups (4: all 64 columns, 2: the first 32).
template <int kColumnGroups, int kStride>
__device__ __forceinline__ void popcount_tile(int (&pacc)[8][4], const u32* a, const u32* b, int tr, int tc,
                                              int k_words) {
  for (int k = 0; k < k_words; ++k)
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < kColumnGroups; ++j) pacc[i][j] += __popc(a[(tr + 16 * i) * kStride + k] & b[(tc + 16 * j) * kStride + k]);
}

// The float-output epilogue with 4 channels a thread (channels_out a multiple of 4): a row's count,
// border taps and address are read once for 4 outputs, which go out in one 16-byte store. A row
// is spread over 16 threads (8 where at most 32 channels are left, so narrow layers keep every
// thread busy). `counts` are the block's AND counts, [kRows][BCONV_COUNT_STRIDE]. With pack_next, 8 neighbouring
// threads hold the 32 channels of one next-layer word: their 4-bit pieces are ORed by shuffles
// (every thread runs every row step, so that the whole warp takes part).
template <int kRows>
__device__ __forceinline__ void bconv2d_float4_epilogue(const BconvArgs& g, const BconvConstants& k, const int* counts,
                                                        const int* row_pop, const unsigned long long* row_outside,
                                                        i64 m0, int n0, i64 rows) {
  const int tid = threadIdx.x;
  const int quads = (g.channels_out - n0 <= 32 ? 32 : BN) / 4;
  const int col = 4 * (tid % quads), c = n0 + col;
  const bool column_valid = c < g.channels_out;  // channels_out % 4 == 0: a thread's 4 channels are all in or all out
  const int half_in = g.channels_in / 2;
  const int next_words = (g.channels_out + 31) / 32;
  int w_pop[4];
  float mul[4], add[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    w_pop[j] = k.weight_pop[col + j];
    mul[j] = k.multiplier[col + j];
    add[j] = k.bias[col + j];
  }
  for (int r = tid / quads; r < kRows; r += THREADS / quads) {
    const bool valid = column_valid && m0 + r < rows;
    u32 bits = 0;  // this thread's 4 bits of the next layer's word
    if (valid) {
      int count[4];
      const uint4 ands = load_uint4(reinterpret_cast<const u32*>(counts) + r * BCONV_COUNT_STRIDE + col);
      const int and_count[4] = {(int)ands.x, (int)ands.y, (int)ands.z, (int)ands.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) count[j] = row_pop[r] + w_pop[j] - 2 * and_count[j];
      if (g.pad_value == 0) {
        unsigned long long outside = row_outside[r];
        while (outside) {
          const int tap = __ffsll((long long)outside) - 1;
          outside &= outside - 1;
          const int* pop = g.tap_pop + (i64)tap * g.channels_out + c;
#pragma unroll
          for (int j = 0; j < 4; ++j) count[j] += half_in - pop[j];
        }
      }
      float v[4], stored[4];
      const i64 at = (m0 + r) * g.out_stride + g.out_offset + c;
      const float4 residual = g.has_residual ? load_float4(g.residual + at) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const float residuals[4] = {residual.x, residual.y, residual.z, residual.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[j] = __fadd_rn(__fmul_rn((float)min(max(2 * count[j], g.clamp_min), g.clamp_max), mul[j]), add[j]);
        stored[j] = g.has_residual ? __fadd_rn(v[j], residuals[j]) : v[j];
      }
      store_float4(reinterpret_cast<float*>(g.out) + at, make_float4(stored[0], stored[1], stored[2], stored[3]));
      if (g.pack_next)
#pragma unroll
        for (int j = 0; j < 4; ++j) bits |= (u32)next_bit(g, k, v[j], col + j) << j;
    }
    if (g.pack_next) {
      const u32 word = word_of_nibbles(bits);
      if (valid && (tid & 7) == 0) g.next_bits[(m0 + r) * next_words + c / 32] = word;
    }
  }
}

// A K chunk's weight rows for the block's channels n0.. (at most BN, the real ones: columns past
// the last channel are never output, so their rows may hold anything), of each only the words of
// the chunk's `steps` MMA steps, into `b` (rows kStride words apart). copy_weight_units: in 16-byte
// units (2 a step), a row kUnitSlots slots (a power of two: no division a copy), the slots past its
// units idle (the weights' rows are 40 words and a chunk 40 or 80: every unit 16-byte aligned).
// copy_weight_pairs: in 8-byte pairs spread over all threads, a division a copy (the popcount
// kernel's: on sm_90 the units' loop makes it spill 12 bytes).
template <int kChunk, int kStride, bool kAsyncCopies>
__device__ __forceinline__ void copy_weight_units(const BconvArgs& g, u32* b, int n0, int chunk, int steps) {
  constexpr int kUnitSlots = kChunk / 4 <= 16 ? 16 : 32;
  static_assert(kChunk / 4 <= kUnitSlots, "a chunk's units fit a row's slots");
  const int units = steps * (KW / 4), slots = min(BN, g.channels_out - n0) * kUnitSlots;
  const u32* src = g.w + (i64)n0 * g.k_stride + chunk * kChunk;
#pragma unroll 1
  for (int i = threadIdx.x; i < slots; i += THREADS) {
    const int n = i / kUnitSlots, u = i % kUnitSlots;
    if (u >= units) continue;
    const u32* from = src + (i64)n * g.k_stride + 4 * u;
    u32* to = b + n * kStride + 4 * u;
    if (kAsyncCopies) {
      copy_async<16>(to, from, true);
    } else {
      const uint4 wv = load_uint4(from);
      to[0] = wv.x, to[1] = wv.y, to[2] = wv.z, to[3] = wv.w;
    }
  }
}

template <int kChunk, int kStride, bool kAsyncCopies>
__device__ __forceinline__ void copy_weight_pairs(const BconvArgs& g, u32* b, int n0, int chunk, int steps) {
  const int pairs = steps * (KW / 2), loads = min(BN, g.channels_out - n0) * pairs;
  const u32* src = g.w + (i64)n0 * g.k_stride + chunk * kChunk;
  for (int i = threadIdx.x; i < loads; i += THREADS) {
    const int n = i / pairs, j = 2 * (i - n * pairs);
    const u32* from = src + (i64)n * g.k_stride + j;
    if (kAsyncCopies) {
      copy_async<8>(b + n * kStride + j, from, true);
    } else {
      const uint2 wv = *reinterpret_cast<const uint2*>(from);
      b[n * kStride + j] = wv.x;
      b[n * kStride + j + 1] = wv.y;
    }
  }
}

// One block: kRows pixels x BN channels, K in chunks of kChunk words (KC for 128-row tiles, 2 KC for the
// small tiles: all of a 3x3 filter over 256 channels in one chunk). The THREADS / kRows neighbouring
// threads of row t / (THREADS / kRows) each load a part of it in each chunk (the chunk's words
// rounded up to whole 256-bit steps, split evenly), stepping through the taps without division,
// and count their set bits (the row popcount of the AND formulation; outside taps load 0).
// kAsyncCopies: the chunk's row and weight words go to shared memory by cp.async, all in flight at
// once, and the row popcounts are counted there afterwards; otherwise through registers, a few
// loads in flight at a time (for GPUs before sm_80 and for grids with more blocks than SMs).
// kTensorCores: 8 warps as kRows / 32 (rows) x 8 / (kRows / 32) (columns), each a tile of 32 rows
// (2 m16 MMAs) by 64 / that many columns (n8 MMAs) per 256 bits: 4 x 2 warps of 32 x 32 for 128
// rows, 2 x 4 of 32 x 16 for 64, 1 x 8 of 32 x 8 for 32 (the small tiles spread a small grid over
// more SMs). Otherwise (128 rows only) each thread counts 8 rows x 4 columns with __popc.
template <bool kTensorCores, bool kAsyncCopies, int kRows = BM, int kChunk = KC>
__device__ void bconv2d_block(const BconvArgs& g) {
  static_assert(kRows == 128 || (kTensorCores && (kRows == 64 || kRows == 32)), "tiles of 128, 64 or 32 rows");
  static_assert(kChunk % KW == 0, "chunks of whole MMA steps");
  // shared-memory rows kChunk + 4 words apart: an odd number of 16-byte units, so that the 8 rows of
  // a fragment load start in 8 different groups of 4 banks (conflict-free)
  constexpr int kStride = kChunk + 4;
  constexpr int kLoaders = THREADS / kRows;             // threads loading each row: 2, 4 or 8
  constexpr int kWarpsM = kRows / 32, kWarpsN = 8 / kWarpsM;
  constexpr int kWarpN = BN / kWarpsN, kTilesN = kWarpN / 8;  // a warp's columns, its n8 MMAs
  __shared__ BconvShared<kRows, kStride> s;
  __shared__ BconvConstants constants;
  __shared__ int row_pop[kRows];
  __shared__ unsigned long long row_outside[kRows];
  const int tid = threadIdx.x;
  const i64 rows = (i64)g.batch * g.out_h * g.out_w;
  const i64 m0 = (i64)blockIdx.x * kRows;
  const int n0 = blockIdx.y * BN;

  // (threadIdx.x is unsigned: dividing by a power of two is a shift)
  const int load_row = (int)(threadIdx.x / kLoaders), load_part = (int)(threadIdx.x % kLoaders);
  const i64 m = m0 + load_row;
  const bool row_valid = m < rows;
  int b = 0, y0 = 0, x0 = 0;
  if (row_valid) {
    const Pixel p = pixel_position(m, g.out_h, g.out_w);
    b = p.b;
    y0 = p.y * g.stride_h - g.pad_top;
    x0 = p.x * g.stride_w - g.pad_left;
  }
  int acc[2][4][4];
  int pacc[8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) pacc[i][j] = 0;

  copy_constants<kAsyncCopies>(g, constants, n0);  // waited for with the first chunk
  int my_pop = 0;
  const int chunks = (g.k_words + kChunk - 1) / kChunk;
  for (int chunk = 0; chunk < chunks; ++chunk) {
    // this chunk's words rounded up to whole MMA steps, split evenly between a row's loaders
    const int steps = min(kChunk / KW, (g.k_words - chunk * kChunk + KW - 1) / KW);
    const int share = steps * (KW / kLoaders);
    const int k0 = chunk * kChunk + load_part * share;
    u32* my_words = s.tiles.a + load_row * kStride + load_part * share;
#if BCONV_STEPPED_GATHER
    if (g.words % 4 == 0 && share % 4 == 0)
      gather_row_stepped<4, kAsyncCopies>(g, my_words, b, y0, x0, row_valid, k0, share, my_pop);
    else if (g.words % 2 == 0 && share % 2 == 0)
      gather_row_stepped<2, kAsyncCopies>(g, my_words, b, y0, x0, row_valid, k0, share, my_pop);
    else
      gather_row_stepped<1, kAsyncCopies>(g, my_words, b, y0, x0, row_valid, k0, share, my_pop);
#else
    gather_row<kAsyncCopies>(g, my_words, b, y0, x0, row_valid, k0, share, my_pop);
#endif
    // the weight rows of the block's real channels, and of each only the words the MMA steps read
    // (narrow layers: 32 rows of 16 words, not 64 of 40)
    if (kTensorCores)
      copy_weight_units<kChunk, kStride, kAsyncCopies>(g, s.tiles.b, n0, chunk, steps);
    else
      copy_weight_pairs<kChunk, kStride, kAsyncCopies>(g, s.tiles.b, n0, chunk, steps);
    // while the first chunk's copies are in flight: the row's taps outside the image, for the
    // epilogue's zero-padding correction (LCE's; pad_value 0 only), by the row's first loader
    if (chunk == 0 && load_part == 0 && g.pad_value == 0)
      row_outside[load_row] = row_valid ? outside_taps(g, y0, x0) : 0;
    if (kAsyncCopies) {
      copy_async_wait();  // this thread's copies are in; its row words are counted from shared memory
      for (int j = 0; j < share; ++j) my_pop += __popc(my_words[j]);
    }
    __syncthreads();
    if (kTensorCores) {
      const int lane = tid & 31, group = lane >> 2, t = lane & 3;
      const int wm = (int)(threadIdx.x / 32 % kWarpsM) * 32, wn = (int)(threadIdx.x / 32 / kWarpsM) * kWarpN;
      // a warp whose columns all lie past the last channel (narrow layers) has nothing to count
      const int warp_steps = n0 + wn < g.channels_out ? steps : 0;
      for (int st = 0; st < warp_steps; ++st) {
        const int k = st * KW + t;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = wm + i * 16 + group;
          const u32 a[4] = {s.tiles.a[r * kStride + k], s.tiles.a[(r + 8) * kStride + k],
                            s.tiles.a[r * kStride + k + 4], s.tiles.a[(r + 8) * kStride + k + 4]};
#pragma unroll
          for (int j = 0; j < kTilesN; ++j) {
            const int n = wn + j * 8 + group;
            mma_and_popc(acc[i][j], a, s.tiles.b[n * kStride + k], s.tiles.b[n * kStride + k + 4]);
          }
        }
      }
    } else {
      const int tr = tid >> 4, tc = tid & 15;
      if (n0 + 32 < g.channels_out)
        popcount_tile<4, kStride>(pacc, s.tiles.a, s.tiles.b, tr, tc, steps * KW);
      else  // at most 32 channels left: columns 32-63 are padding
        popcount_tile<2, kStride>(pacc, s.tiles.a, s.tiles.b, tr, tc, steps * KW);
    }
    __syncthreads();
  }
  // the loaders of a row are neighbouring lanes
#pragma unroll
  for (int other = 1; other < kLoaders; other <<= 1) my_pop += __shfl_xor_sync(0xffffffffu, my_pop, other);
  if (load_part == 0) row_pop[load_row] = my_pop;

  // AND counts to shared memory (m16n8 accumulator layout: c0, c1 row g, columns 2t, 2t+1; c2, c3 row g+8)
  if (kTensorCores) {
    const int lane = tid & 31, group = lane >> 2, t = lane & 3;
    const int wm = (int)(threadIdx.x / 32 % kWarpsM) * 32, wn = (int)(threadIdx.x / 32 / kWarpsM) * kWarpN;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        const int r = wm + i * 16 + group, c = wn + j * 8 + 2 * t;
        u32* counts = reinterpret_cast<u32*>(s.c);
        store_uint2(counts + r * BCONV_COUNT_STRIDE + c, (u32)acc[i][j][0], (u32)acc[i][j][1]);
        store_uint2(counts + (r + 8) * BCONV_COUNT_STRIDE + c, (u32)acc[i][j][2], (u32)acc[i][j][3]);
      }
  } else {
    const int tr = tid >> 4, tc = tid & 15;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s.c[(tr + 16 * i) * BCONV_COUNT_STRIDE + tc + 16 * j] = pacc[i][j];
  }
  __syncthreads();

  if (!g.packed_output && g.channels_out % 4 == 0 && g.out_stride % 4 == 0 && g.out_offset % 4 == 0) {
    bconv2d_float4_epilogue<kRows>(g, constants, s.c, row_pop, row_outside, m0, n0, rows);
    return;
  }
  // epilogue: XOR count, LCE's zero-padding correction, output transform. A row's columns are
  // spread over `span` threads (64, or 32 where at most 32 channels are left, so that narrow layers
  // keep every thread busy); a thread keeps one column (tid % span), so its channel's constants
  // are loaded once, and a warp is 32 channels of one pixel, so a ballot is one bit-packed word.
  const int half_in = g.channels_in / 2;
  const int out_words = (g.channels_out + 31) / 32;
  const int span = g.channels_out - n0 <= 32 ? 32 : BN;
  const int col = tid % span, c = n0 + col;
  const bool column_valid = c < g.channels_out;
  const int w_pop = constants.weight_pop[col];
  const float mul = g.packed_output ? 0.0f : constants.multiplier[col];
  const float add = g.packed_output ? 0.0f : constants.bias[col];
  const int threshold = g.packed_output ? constants.threshold[col] : 0;
  for (int r = tid / span; r < kRows; r += THREADS / span) {
    const i64 mr = m0 + r;
    const bool valid = mr < rows && column_valid;
    int xor_count = 0;
    if (valid) {
      xor_count = row_pop[r] + w_pop - 2 * s.c[r * BCONV_COUNT_STRIDE + col];
      if (g.pad_value == 0) {
        unsigned long long outside = row_outside[r];
        while (outside) {
          const int tap = __ffsll((long long)outside) - 1;
          outside &= outside - 1;
          xor_count += half_in - g.tap_pop[(i64)tap * g.channels_out + c];
        }
      }
    }
    if (g.packed_output) {
      const u32 word = __ballot_sync(0xffffffffu, valid && xor_count > threshold);
      if ((col & 31) == 0 && valid) reinterpret_cast<u32*>(g.out)[mr * out_words + c / 32] = word;
    } else {
      float value = 0.0f;
      if (valid) {
        value = __fadd_rn(__fmul_rn((float)min(max(2 * xor_count, g.clamp_min), g.clamp_max), mul), add);
        const i64 at = mr * g.out_stride + g.out_offset + c;
        reinterpret_cast<float*>(g.out)[at] = g.has_residual ? __fadd_rn(value, g.residual[at]) : value;
      }
      if (g.pack_next) {  // a warp is 32 channels of one pixel: its ballot is the next layer's word
        const u32 word = __ballot_sync(0xffffffffu, valid && next_bit(g, constants, value, col));
        if ((col & 31) == 0 && valid) g.next_bits[mr * out_words + c / 32] = word;
      }
    }
  }
}

// CuPy passes scalars one by one: the kernels take them as arguments and gather them.
#define BCONV_PARAMS                                                                                       \
  const u32 *x, const u32 *w, const int *weight_pop, const int *tap_pop, const float *multiplier,          \
      const float *bias, const int *thresholds, void *out, const float *residual, u32 *next_bits,          \
      const float *next_scale, const float *next_shift, int batch, int height, int width, int words,       \
      int out_h, int out_w, int channels_in, int channels_out, int filter_h, int filter_w, int stride_h,   \
      int stride_w, int dilation_h, int dilation_w, int pad_top, int pad_left, int pad_value, int k_words, \
      int k_stride, int clamp_min, int clamp_max, int packed_output, int pack_next, int has_next_scale,    \
      int has_next_shift, int out_stride, int out_offset, int has_residual
#define BCONV_ARGS                                                                                         \
  BconvArgs{x,           w,          weight_pop,  tap_pop,     multiplier,    bias,       thresholds,      \
            out,         residual,   next_bits,   next_scale,  next_shift,    batch,      height,          \
            width,       words,      out_h,       out_w,       channels_in,   channels_out, filter_h,      \
            filter_w,    stride_h,   stride_w,    dilation_h,  dilation_w,    pad_top,    pad_left,        \
            pad_value,   k_words,    k_stride,    clamp_min,   clamp_max,     packed_output, pack_next,    \
            has_next_scale, has_next_shift, out_stride, out_offset, has_residual}

extern "C" __global__ void __launch_bounds__(THREADS, BCONV_MIN_BLOCKS) bconv2d_tensor_cores(BCONV_PARAMS) {
  bconv2d_block<true, true>(BCONV_ARGS);
}

// the tensor-core kernel with its loads through registers (grids of more blocks than SMs)
extern "C" __global__ void __launch_bounds__(THREADS, BCONV_MIN_BLOCKS)
    bconv2d_tensor_cores_register_loads(BCONV_PARAMS) {
  bconv2d_block<true, false>(BCONV_ARGS);
}

// the tensor-core kernel with tiles of 64 and 32 rows (cp.async loads), for grids of fewer blocks than SMs
extern "C" __global__ void __launch_bounds__(THREADS, BCONV_MIN_BLOCKS) bconv2d_tensor_cores_rows64(BCONV_PARAMS) {
  bconv2d_block<true, true, 64, 2 * KC>(BCONV_ARGS);
}

extern "C" __global__ void __launch_bounds__(THREADS, BCONV_MIN_BLOCKS) bconv2d_tensor_cores_rows32(BCONV_PARAMS) {
  bconv2d_block<true, true, 32, 2 * KC>(BCONV_ARGS);
}

extern "C" __global__ void __launch_bounds__(THREADS, BCONV_MIN_BLOCKS) bconv2d_popcount(BCONV_PARAMS) {
  bconv2d_block<false, false>(BCONV_ARGS);
}

// im2col for float convolutions: cols[pixel, (fy, fx, c)], zeros outside the image and in the
// columns from k = filter_h * filter_w * channels up to cols_k (the product's K rounded up to a
// multiple of 4, so that cuBLAS finds every row 16-byte aligned); cuBLAS does the GEMM. A block is
// `block_pixels` output pixels (at most IM2COL_PIXELS), a row of cols a pixel's `units` units of
// (tap, 4 channels): a tap's channels are contiguous in x and in cols, one float4 where channels %
// 4 == 0 and both arrays are 16-byte aligned. The block's threads first put each pixel's image offset
// and top-left input in shared memory (the one 64-bit division a pixel); then min(units, threads)
// neighbouring threads share a pixel, each with its own units, and the block's threads step through
// its pixels that many at a time: a unit's tap and channels are worked out once a thread, not once a
// copy, and each step writes a contiguous range of cols.
#define IM2COL_PIXELS 256
extern "C" __global__ void im2col(const float* x, int batch, int height, int width, int channels, int out_h,
                                  int out_w, int filter_h, int filter_w, int stride_h, int stride_w, int dilation_h,
                                  int dilation_w, int pad_top, int pad_left, int block_pixels, int cols_k,
                                  float* cols) {
  __shared__ i64 image_at[IM2COL_PIXELS];
  __shared__ int top[IM2COL_PIXELS], left[IM2COL_PIXELS];
  const i64 first = (i64)blockIdx.x * block_pixels;
  const int count = (int)min((i64)block_pixels, (i64)batch * out_h * out_w - first);
  for (int p = threadIdx.x; p < count; p += blockDim.x) {
    const Pixel q = pixel_position(first + p, out_h, out_w);
    image_at[p] = (i64)q.b * height * width * channels;
    top[p] = q.y * stride_h - pad_top;
    left[p] = q.x * stride_w - pad_left;
  }
  __syncthreads();
  const int taps = filter_h * filter_w, groups = (channels + 3) / 4, units = taps * groups, k = taps * channels;
  const int lanes = min(units, (int)blockDim.x), pixel_step = (int)blockDim.x / lanes;  // threads a pixel, pixels a step
  const int first_pixel = (int)threadIdx.x / lanes, lane = (int)threadIdx.x - first_pixel * lanes;
  if (first_pixel >= pixel_step) return;  // the threads past a whole number of pixels
  const bool vector = channels % 4 == 0 && ((reinterpret_cast<unsigned long long>(x) |
                                             reinterpret_cast<unsigned long long>(cols)) & 15) == 0;
  float* block_cols = cols + first * cols_k;
  for (int unit = lane; unit < units; unit += lanes) {
    const int tap = unit / groups, c0 = 4 * (unit - tap * groups), n = min(4, channels - c0);
    const int fy = tap / filter_w, fx = tap - fy * filter_w;
    const int dy = fy * dilation_h, dx = fx * dilation_w, column = tap * channels + c0;
    const bool pads = unit == units - 1 && cols_k > k;  // the row's last unit: its padding columns too
    for (int p = first_pixel; p < count; p += pixel_step) {
      const int y = top[p] + dy, xx = left[p] + dx;
      const bool inside = y >= 0 && y < height && xx >= 0 && xx < width;
      const float* src = x + image_at[p] + ((i64)y * width + xx) * channels + c0;  // read only inside
      float* row = block_cols + (i64)p * cols_k;
      if (vector) {
        store_float4(row + column, inside ? load_float4(src) : make_float4(0.0f, 0.0f, 0.0f, 0.0f));
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (j < n) row[column + j] = inside ? src[j] : 0.0f;
      }
      if (pads)
#pragma unroll
        for (int j = 0; j < 3; ++j)  // cols_k < k + 4
          if (k + j < cols_k) row[k + j] = 0.0f;
    }
  }
}

// A float convolution's output from cuBLAS's product `y` ([pixels * ph * pw, channels], a layout of
// [batch, out_h * ph, out_w * pw, channels]; `out` may be `y` where ph = pw = 1), its MAX_POOL_2D of
// a ph x pw window and stride (1 x 1: none) and the bits of the LceQuantize that reads it (pack),
// in one pass: each value of a window is clamp((y + bias) + residual) (the residual where
// has_residual; TFLite's clamp, rounded as the ops), `out` their maximum (fmaxf from -inf, as
// pool2d: NaN left out where ph * pw > 1, kept where 1 x 1), and the bit out * scale + shift < 0
// (bitpack's, each optional). Blocks of 256 threads, each warp one output pixel (blockIdx.x * 8 +
// the warp) and 32 channels (word blockIdx.y of its bits, lane c % 32): a ballot is one word.
extern "C" __global__ void conv_output(const float* y, const float* bias, const float* residual, int has_residual,
                                       float lo, float hi, i64 pixels, int out_w, int channels, int ph, int pw,
                                       float* out, int pack, const float* scale, const float* shift, int has_scale,
                                       int has_shift, int* bits) {
  const i64 pixel = (i64)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32, c = blockIdx.y * 32 + lane;
  bool bit = false;
  if (pixel < pixels && c < channels) {
    i64 corner = pixel * channels + c;  // the window's first value in y
    if (ph * pw > 1) {  // pixel = (b * out_h + oy) * out_w + ox: the window's rows from (b * out_h + oy) * ph
      const i64 row = pixel / out_w;
      corner = (row * ph * out_w + (pixel - row * out_w)) * pw * channels + c;
    }
    const i64 row_step = (i64)out_w * pw * channels;
    float v = 0.0f;
    for (int dy = 0; dy < ph; ++dy)
      for (int dx = 0; dx < pw; ++dx) {
        const i64 at = corner + dy * row_step + dx * channels;
        float r = __fadd_rn(y[at], bias[c]);
        if (has_residual) r = __fadd_rn(r, residual[at]);
        r = clamp_as_tflite(r, lo, hi);
        v = (dy | dx) == 0 ? (ph * pw > 1 ? fmaxf(__int_as_float(0xff800000), r) : r) : fmaxf(v, r);
      }
    out[pixel * channels + c] = v;
    if (pack) bit = quantized_bit(v, scale, shift, has_scale, has_shift, c);
  }
  if (pack) {
    const u32 ballot = __ballot_sync(0xffffffffu, bit);
    if (lane == 0 && pixel < pixels) bits[pixel * gridDim.y + blockIdx.y] = (int)ballot;
  }
}

// conv_output with 4 channels a thread (channels % 4 == 0; every array 16-byte aligned): one
// 16-byte load of y and of the residual a window position, one store of out, so that each thread
// has 4 times the bytes in flight (conv_output, a value a thread, ran at about 40% of the H200's
// bandwidth). The residual is up to 4 arrays `r0`..`r3` (`residual_parts` of them), the channel
// CONCATENATION that the ADD adds, never written out: part i holds channels [end(i - 1), end(i)),
// `end0`..`end2` (the last part ends at `channels`), each a multiple of 4 channels, laid out as y
// with its own channels. A pixel takes `quads` threads (4 channels each; with pack, 8 for each word
// of its bits, the tail's threads idle, so that a word's 8 threads are 8 aligned lanes whose 4-bit
// pieces are ORed by shuffles); threads are pixel-major, so a warp's accesses are contiguous.
extern "C" __global__ void conv_output_float4(const float* y, const float* bias, const float* r0, const float* r1,
                                              const float* r2, const float* r3, int residual_parts, int end0,
                                              int end1, int end2, float lo, float hi, i64 pixels, int out_w,
                                              int channels, int quads, int ph, int pw, float* out, int pack,
                                              const float* scale, const float* shift, int has_scale, int has_shift,
                                              int* bits) {
  const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 pixel = t / quads;
  const int c = 4 * (int)(t - pixel * quads);
  const bool valid = pixel < pixels && c < channels;
  u32 nibble = 0;
  if (valid) {
    // the residual's part holding channels c..c + 3, and their place in it
    const int part = residual_parts == 0 ? 0 : (c >= end0) + (c >= end1) + (c >= end2);
    const int start = part == 0 ? 0 : part == 1 ? end0 : part == 2 ? end1 : end2;
    const int stop = part == 0 ? end0 : part == 1 ? end1 : part == 2 ? end2 : channels;
    const float* r = part == 0 ? r0 : part == 1 ? r1 : part == 2 ? r2 : r3;
    // the window's first pixel of y (pixel = (b * out_h + oy) * out_w + ox; y's rows are ph times as many)
    const i64 row = pixel / out_w;
    const i64 first = (row * ph * out_w + (pixel - row * out_w)) * pw;
    const i64 row_step = (i64)out_w * pw;
    float b[4], v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = bias[c + j];
    for (int dy = 0; dy < ph; ++dy)
      for (int dx = 0; dx < pw; ++dx) {
        const i64 q = first + dy * row_step + dx;
        float ys[4], rs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        load_floats<4>(y + q * channels + c, ys);
        if (residual_parts > 0) load_floats<4>(r + q * (stop - start) + (c - start), rs);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float value = __fadd_rn(ys[j], b[j]);
          if (residual_parts > 0) value = __fadd_rn(value, rs[j]);
          value = clamp_as_tflite(value, lo, hi);
          v[j] = (dy | dx) == 0 ? (ph * pw > 1 ? fmaxf(__int_as_float(0xff800000), value) : value)
                                : fmaxf(v[j], value);
        }
      }
    store_floats<4>(out + pixel * channels + c, v);
    if (pack)
#pragma unroll
      for (int j = 0; j < 4; ++j) nibble |= (u32)quantized_bit(v[j], scale, shift, has_scale, has_shift, c + j) << j;
  }
  if (pack) {  // (every thread of the block: the whole warp takes part in the shuffles)
    const u32 word = word_of_nibbles(nibble);
    if (pixel < pixels && (threadIdx.x & 7) == 0 && c < channels) bits[pixel * (quads / 8) + c / 32] = (int)word;
  }
}

// The Predictor's crops of one image (uint8, HWC) on the GPU: out[n, y, x, c] samples the image,
// as floats v / 255 (tf.image.convert_image_dtype), at params[n] (8 projective parameters, crop
// pixel -> image pixel) applied to (x, y), bilinear, 0 outside the image: TensorFlow's
// ImageProjectiveTransformV3 with BILINEAR and CONSTANT fill 0, computed the same way. One thread
// per output pixel.
__device__ __forceinline__ float image_value(const u8* image, int height, int width, int channels,
                                             float y, float x, int c) {
  // y and x are whole (floors, or floors + 1): compared as floats, so that no far-off coordinate
  // (or NaN) is cast to an int
  if (!(y >= 0.0f && x >= 0.0f && y < (float)height && x < (float)width)) return 0.0f;
  return __fmul_rn((float)image[((i64)y * width + (int)x) * channels + c], 1.0f / 255.0f);
}

extern "C" __global__ void warp_crops(const u8* image, int height, int width, int channels,
                                      const float* params, int crops, int size, float* out) {
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (i64)crops * size * size) return;
  const int n = (int)(idx / ((i64)size * size)), rest = (int)(idx - (i64)n * size * size);
  const float oy = (float)(rest / size), ox = (float)(rest % size);
  const float* t = params + 8 * n;
  float* o = out + idx * channels;
  const float projection = __fadd_rn(__fadd_rn(__fmul_rn(t[6], ox), __fmul_rn(t[7], oy)), 1.0f);
  if (projection == 0.0f) {
    for (int c = 0; c < channels; ++c) o[c] = 0.0f;
    return;
  }
  const float x = __fdiv_rn(__fadd_rn(__fadd_rn(__fmul_rn(t[0], ox), __fmul_rn(t[1], oy)), t[2]), projection);
  const float y = __fdiv_rn(__fadd_rn(__fadd_rn(__fmul_rn(t[3], ox), __fmul_rn(t[4], oy)), t[5]), projection);
  const float y0 = floorf(y), x0 = floorf(x), y1 = y0 + 1.0f, x1 = x0 + 1.0f;
  for (int c = 0; c < channels; ++c) {
    const float top = __fadd_rn(__fmul_rn(x1 - x, image_value(image, height, width, channels, y0, x0, c)),
                                __fmul_rn(x - x0, image_value(image, height, width, channels, y0, x1, c)));
    const float bottom = __fadd_rn(__fmul_rn(x1 - x, image_value(image, height, width, channels, y1, x0, c)),
                                   __fmul_rn(x - x0, image_value(image, height, width, channels, y1, x1, c)));
    o[c] = __fadd_rn(__fmul_rn(y1 - y, top), __fmul_rn(y - y0, bottom));
  }
}

// CONCATENATION along channels, one part at a time: out[pixel, offset + c] = part[pixel, c], plus
// the residual of a fused ADD, so that each output is written once.
extern "C" __global__ void concat_part(const float* part, int part_channels, int offset, int channels,
                                       const float* residual, int has_residual, i64 pixels, float* out) {
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= pixels * part_channels) return;
  const i64 pixel = idx / part_channels;
  const i64 at = pixel * channels + offset + (idx - pixel * part_channels);
  out[at] = has_residual ? part[idx] + residual[at] : part[idx];
}

// RESIZE_NEAREST_NEIGHBOR with the source rows and columns given, plus the residual of a fused ADD
// and its activation. V channels a thread (resize_nearest: 1; resize_nearest_float4: 4, where the
// channels are a multiple of 4 and the arrays 16-byte aligned: one 16-byte load and store each).
#define RESIZE_NEAREST_PARAMS                                                                                    \
  const float *x, const int *rows, const int *cols, int batch, int height, int width, int channels, int out_h,  \
      int out_w, const float *residual, int has_residual, float lo, float hi, float *out
template <int V>
__device__ __forceinline__ void resize_nearest_values(RESIZE_NEAREST_PARAMS) {
  const i64 idx = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (idx >= (i64)batch * out_h * out_w * channels) return;
  const Element e = element_position(idx, channels, out_h, out_w);
  float v[V], r[V];
  load_floats<V>(x + (((i64)e.b * height + rows[e.y]) * width + cols[e.x]) * channels + e.c, v);
  if (has_residual) {
    load_floats<V>(residual + idx, r);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = clamp_as_tflite(v[j] + r[j], lo, hi);
  }
  store_floats<V>(out + idx, v);
}

extern "C" __global__ void resize_nearest(RESIZE_NEAREST_PARAMS) {
  resize_nearest_values<1>(x, rows, cols, batch, height, width, channels, out_h, out_w, residual, has_residual, lo,
                           hi, out);
}

extern "C" __global__ void resize_nearest_float4(RESIZE_NEAREST_PARAMS) {
  resize_nearest_values<4>(x, rows, cols, batch, height, width, channels, out_h, out_w, residual, has_residual, lo,
                           hi, out);
}

// MAX_POOL_2D (kind 0) and AVERAGE_POOL_2D (kind 1, mean over the taps inside the image), clamped.
// V channels a thread, as resize_nearest's.
#define POOL2D_PARAMS                                                                                          \
  const float *x, int batch, int height, int width, int channels, int out_h, int out_w, int filter_h,          \
      int filter_w, int stride_h, int stride_w, int pad_top, int pad_left, int kind, float lo, float hi, float *out
template <int V>
__device__ __forceinline__ void pool2d_values(POOL2D_PARAMS) {
  const i64 idx = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (idx >= (i64)batch * out_h * out_w * channels) return;
  const Element e = element_position(idx, channels, out_h, out_w);
  float acc[V], v[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = kind == 0 ? __int_as_float(0xff800000) : 0.0f;  // -inf
  int taps = 0;
  for (int fy = 0; fy < filter_h; ++fy)
    for (int fx = 0; fx < filter_w; ++fx) {
      const int y = e.y * stride_h - pad_top + fy, xx = e.x * stride_w - pad_left + fx;
      if (y < 0 || y >= height || xx < 0 || xx >= width) continue;
      ++taps;
      load_floats<V>(x + (((i64)e.b * height + y) * width + xx) * channels + e.c, v);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = kind == 0 ? fmaxf(acc[j], v[j]) : acc[j] + v[j];
    }
#pragma unroll
  for (int j = 0; j < V; ++j)
    v[j] = clamp_as_tflite(kind == 0 ? acc[j] : acc[j] * (1.0f / (float)max(taps, 1)), lo, hi);
  store_floats<V>(out + idx, v);
}

extern "C" __global__ void pool2d(POOL2D_PARAMS) {
  pool2d_values<1>(x, batch, height, width, channels, out_h, out_w, filter_h, filter_w, stride_h, stride_w, pad_top,
                   pad_left, kind, lo, hi, out);
}

extern "C" __global__ void pool2d_float4(POOL2D_PARAMS) {
  pool2d_values<4>(x, batch, height, width, channels, out_h, out_w, filter_h, filter_w, stride_h, stride_w, pad_top,
                   pad_left, kind, lo, hi, out);
}

// The batch norm folded before a float convolution (x * mul + add, each optional, rounded as the
// ops; then TFLite's clamp): V channels a thread, as resize_nearest's.
#define INPUT_TRANSFORM_PARAMS                                                                                 \
  const float *x, const float *mul, const float *add, i64 count, int channels, int has_mul, int has_add, float lo, \
      float hi, float *out
template <int V>
__device__ __forceinline__ void input_transform_values(INPUT_TRANSFORM_PARAMS) {
  const i64 idx = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (idx >= count) return;
  const int c = (int)(idx % channels);
  float v[V];
  load_floats<V>(x + idx, v);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (has_mul) v[j] = __fmul_rn(v[j], mul[c + j]);
    if (has_add) v[j] = __fadd_rn(v[j], add[c + j]);
    v[j] = clamp_as_tflite(v[j], lo, hi);
  }
  store_floats<V>(out + idx, v);
}

extern "C" __global__ void input_transform(INPUT_TRANSFORM_PARAMS) {
  input_transform_values<1>(x, mul, add, count, channels, has_mul, has_add, lo, hi, out);
}

extern "C" __global__ void input_transform_float4(INPUT_TRANSFORM_PARAMS) {
  input_transform_values<4>(x, mul, add, count, channels, has_mul, has_add, lo, hi, out);
}
