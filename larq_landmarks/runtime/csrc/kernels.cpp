// Kernels of larq_landmarks.runtime: bit-packing, binary convolution with LCE's output transform
// fused, float convolution, and the element-wise ops of the named models.
//
// One source, built four times by setup.py with different instruction sets, each through the
// file that names its Python module (RUNTIME_MODULE): kernels_avx512.cpp -> _kernels_avx512 (AVX-512
// with VPOPCNTDQ), kernels_avx512bw.cpp -> _kernels_avx512bw (AVX-512 F/BW/VL/DQ without VPOPCNTDQ,
// as Skylake-SP and Cascade Lake Xeons have: the same kernels, the popcount by nibble look-up),
// kernels_avx2.cpp -> _kernels_avx2 (AVX2 + FMA), kernels_portable.cpp -> _kernels_portable
// (baseline C++). Python picks one at run time from the CPU's features.
//
// Tensors are NHWC and C-contiguous. Bit-packed tensors follow LCE: int32 words along the channel
// axis, ceil(C / 32) words per pixel, bit i of word w is channel 32 w + i, a set bit means the value
// was negative (-1), padding bits are 0.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace py = pybind11;

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
static const char* kPath = "avx512";
constexpr int kFloatLanes = 16;
#elif defined(__AVX512F__)
static const char* kPath = "avx512bw";
constexpr int kFloatLanes = 16;
#elif defined(__AVX2__)
static const char* kPath = "avx2";
constexpr int kFloatLanes = 8;
#else
static const char* kPath = "portable";
constexpr int kFloatLanes = 4;
#endif

typedef float vfloat __attribute__((vector_size(kFloatLanes * 4)));

// bfloat16 float convolutions (conv2d_bf16): AVX-512 builds whose compiler knows AVX512_BF16 (GCC 10,
// Clang 9 and newer; -DLARQ_LANDMARKS_NO_BF16 leaves them out). Without them the module has no
// conv2d_bf16 and Engine(float_precision="bfloat16") says so.
#if defined(__AVX512F__) && !defined(LARQ_LANDMARKS_NO_BF16) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif

// int8 float convolutions (conv2d_int8), in one of two forms giving the same integer sums:
// - VNNI's (HAVE_VNNI): VPDPBUSD, four products of an unsigned and a signed byte a lane. AVX-512
//   builds whose compiler knows AVX512_VNNI (GCC 8, Clang 6 and newer), AVX2 builds whose compiler
//   knows AVX-VNNI (its 256-bit VEX form, on Intel's Alder Lake and newer client CPUs and AMD's Zen 5;
//   GCC 11, Clang 12 and newer); run where the CPU has it (INT8_FEATURE).
// - the pairs form (HAVE_INT8_PAIRS): VPMADDWD and an add, two products of the same values widened
//   to 16 bits, on every AVX2 CPU (Haswell to Comet Lake, AMD before Zen 5). AVX2 builds only: with
//   512-bit vectors it was no faster than the float32 FMAs (Zen 5).
// -DLARQ_LANDMARKS_NO_VNNI leaves VNNI's form out. An AVX-512 build without it has no conv2d_int8,
// and Engine(float_precision="int8") says so.
#if defined(__AVX512F__) && !defined(LARQ_LANDMARKS_NO_VNNI) && \
    ((defined(__clang__) && __clang_major__ >= 6) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 8))
#define HAVE_VNNI 1
#define INT8_FEATURE "avx512vnni"
#elif !defined(__AVX512F__) && defined(__AVX2__) && !defined(LARQ_LANDMARKS_NO_VNNI) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define HAVE_VNNI 1
#define INT8_FEATURE "avxvnni"
#else
#define HAVE_VNNI 0
#endif
#if !defined(__AVX512F__) && defined(__AVX2__)
#define HAVE_INT8_PAIRS 1
#else
#define HAVE_INT8_PAIRS 0
#endif
#define HAVE_INT8 (HAVE_VNNI || HAVE_INT8_PAIRS)

// AMX's tiles (Intel Xeons from Sapphire Rapids on) for the int8 and bfloat16 float convolutions
// (gemm_rows_amx): the avx512 build, on Linux (a process asks it for the tiles' state), with GCC 11 or
// Clang 12 and newer; -DLARQ_LANDMARKS_NO_AMX leaves them out. Run where the CPU has them and the
// environment variable LARQ_LANDMARKS_NO_AMX is not 1 (amx_enabled).
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__linux__) && defined(__x86_64__) && \
    !defined(LARQ_LANDMARKS_NO_AMX) && HAVE_VNNI && HAVE_BF16 &&                                          \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define HAVE_AMX 0
#endif

// ---------------------------------------------------------------------------------------------
// A small persistent thread pool: parallel_for(n, fn) runs fn(begin, end) over [0, n) in chunks.
// The chunks (about kChunksPerThread per thread) are handed out in order to whichever thread asks
// next, so a thread on a slower or busier core takes fewer of them (hybrid CPUs, shared VMs);
// each index is still computed by exactly the same code, so results do not depend on the split.
// Workers spin for a while (about a millisecond) before sleeping: a model's ops follow each other
// within microseconds, and waking a sleeping thread costs more than most ops take.
class ThreadPool {
 public:
  ~ThreadPool() { resize(1); }

  void resize(int threads) {
    if (threads < 1) threads = 1;
    std::lock_guard<std::mutex> in_use(in_use_);  // not while a parallel_for runs
    if (threads == static_cast<int>(workers_.size()) + 1) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
    workers_.clear();
    stop_ = false;
    const uint64_t now = generation_.load();  // new workers wait for the next task, not a finished one
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i, now] { loop(i, now); });
  }

  int size() {
    std::lock_guard<std::mutex> in_use(in_use_);
    return static_cast<int>(workers_.size()) + 1;
  }

  // Several Python threads may run ops at once (the kernels release the GIL): the pool serves one
  // caller at a time, and a caller that finds it busy runs its whole range itself, which gives the
  // same results (every index is computed by the same code whatever the split). Not nested: no
  // task calls parallel_for.
  void parallel_for(int n, const std::function<void(int, int)>& fn) {
    std::unique_lock<std::mutex> in_use(in_use_, std::try_to_lock);
    const int threads = in_use.owns_lock() ? std::min(static_cast<int>(workers_.size()) + 1, n) : 1;
    if (threads <= 1) {
      if (in_use.owns_lock()) in_use.unlock();
      if (n > 0) fn(0, n);
      return;
    }
    task_ = &fn;
    total_ = n;
    chunk_ = std::max(1, n / (threads * kChunksPerThread));
    next_.store(0, std::memory_order_relaxed);
    active_ = threads;
    pending_.store(threads - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    run_chunks();
    while (pending_.load(std::memory_order_acquire) != 0) pause();
    task_ = nullptr;
  }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  void run_chunks() {
    for (;;) {
      const int begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
      if (begin >= total_) return;
      (*task_)(begin, std::min(total_, begin + chunk_));
    }
  }

  void loop(int index, uint64_t seen) {
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(1000);
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        pause();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      if (index < active_) {
        run_chunks();
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex in_use_;  // held by the caller of parallel_for (and by resize)
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void(int, int)>* task_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  static constexpr int kChunksPerThread = 8;
  std::atomic<int> next_{0};
  int total_ = 0, active_ = 0, chunk_ = 1;
  bool stop_ = false;
};

static ThreadPool& pool() {
  static ThreadPool instance;
  return instance;
}

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
static T* data(Array<T>& a) {
  return a.mutable_data();
}

// The data of an array argument taken as py::array (no conversion: a few hundred nanoseconds less
// per array than Array<T>'s cast, which builds a new array object each call), after checking that it
// is what the kernel reads: type T, C-contiguous, `ndim` dimensions (any where ndim < 0), writeable
// where it is written. Outputs are always taken this way: a cast would write to a converted copy.
template <typename T>
static T* checked_data(const py::array& a, int ndim, bool writeable, const char* what) {
  if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style) || (ndim >= 0 && a.ndim() != ndim) ||
      (writeable && !a.writeable()))
    throw std::invalid_argument(std::string(what) + ": expected a C-contiguous " +
                                (ndim >= 0 ? std::to_string(ndim) + "-d " : "") +
                                (std::is_same<T, float>::value ? "float32" : "int32") + " array" +
                                (writeable ? " (writeable)" : ""));
  return static_cast<T*>(const_cast<void*>(a.data()));
}

// A new array whose data starts on a 64-byte boundary (numpy's own start 16 or 32 bytes past one,
// and then every 64-byte vector load of a weight row spans two cache lines).
template <typename T>
static Array<T> aligned_array(const std::vector<py::ssize_t>& shape) {
  size_t bytes = sizeof(T);
  for (auto n : shape) bytes *= static_cast<size_t>(n);
  void* memory = std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64);
  if (!memory) throw std::bad_alloc();
  py::capsule owner(memory, [](void* p) { std::free(p); });
  return Array<T>(shape, static_cast<T*>(memory), owner);
}

// ---------------------------------------------------------------------------------------------
// Bit-packing: bit = (x * multiplier[c] + bias[c] < 0), each part optional (LceQuantize, with the
// per-channel MUL and ADD of a preceding batch norm fused in). The product and the sum are rounded
// separately, as the unfused ops round them (no FMA contraction here).
// The bits of `pixels` consecutive pixels of `channels` floats at x into `words` int32 words a pixel
// at out (m, b: per channel, or null). bitpack's work, and the epilogue of the float ops that pack
// their own output rows for the LceQuantize that reads them (RowPack), while those rows are in cache.
__attribute__((optimize("fp-contract=off")))
static void pack_pixels(const float* x, int64_t pixels, int channels, const float* m, const float* b, int32_t* out) {
  const int words = (channels + 31) / 32;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* row = x + p * channels;
    int32_t* packed = out + p * words;
    for (int w = 0; w < words; ++w) {
      const int c0 = 32 * w, n = std::min(32, channels - c0);
      uint32_t bits = 0;
#if defined(__AVX512F__)
      if (n == 32) {
        __m512 lo = _mm512_loadu_ps(row + c0), hi = _mm512_loadu_ps(row + c0 + 16);
        if (m) {
          lo = _mm512_mul_ps(lo, _mm512_loadu_ps(m + c0));
          hi = _mm512_mul_ps(hi, _mm512_loadu_ps(m + c0 + 16));
        }
        if (b) {
          lo = _mm512_add_ps(lo, _mm512_loadu_ps(b + c0));
          hi = _mm512_add_ps(hi, _mm512_loadu_ps(b + c0 + 16));
        }
        const __m512 zero = _mm512_setzero_ps();
        bits = static_cast<uint32_t>(_mm512_cmp_ps_mask(lo, zero, _CMP_LT_OQ)) |
               (static_cast<uint32_t>(_mm512_cmp_ps_mask(hi, zero, _CMP_LT_OQ)) << 16);
        packed[w] = static_cast<int32_t>(bits);
        continue;
      }
#elif defined(__AVX2__)
      if (n == 32) {
        for (int q = 0; q < 4; ++q) {  // 8 channels a vector: their sign bits by movemask
          __m256 v = _mm256_loadu_ps(row + c0 + 8 * q);
          if (m) v = _mm256_mul_ps(v, _mm256_loadu_ps(m + c0 + 8 * q));
          if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + c0 + 8 * q));
          const __m256 negative = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
          bits |= static_cast<uint32_t>(_mm256_movemask_ps(negative)) << (8 * q);
        }
        packed[w] = static_cast<int32_t>(bits);
        continue;
      }
#elif defined(__SSE2__)
      if (n == 32) {  // x86-64's baseline: as above, 4 channels a vector
        for (int q = 0; q < 8; ++q) {
          __m128 v = _mm_loadu_ps(row + c0 + 4 * q);
          if (m) v = _mm_mul_ps(v, _mm_loadu_ps(m + c0 + 4 * q));
          if (b) v = _mm_add_ps(v, _mm_loadu_ps(b + c0 + 4 * q));
          bits |= static_cast<uint32_t>(_mm_movemask_ps(_mm_cmplt_ps(v, _mm_setzero_ps()))) << (4 * q);
        }
        packed[w] = static_cast<int32_t>(bits);
        continue;
      }
#endif
      for (int i = 0; i < n; ++i) {
        float v = row[c0 + i];
        if (m) v = v * m[c0 + i];
        if (b) v = v + b[c0 + i];
        bits |= static_cast<uint32_t>(v < 0.0f) << i;
      }
      packed[w] = static_cast<int32_t>(bits);
    }
  }
}

static void bitpack(Array<float> input, Array<float> multiplier, Array<float> bias, py::array output) {
  const int channels = static_cast<int>(input.shape(input.ndim() - 1));
  const int words = (channels + 31) / 32;
  const int64_t pixels = input.size() / std::max(channels, 1);
  if (output.size() != pixels * words) throw std::invalid_argument("bitpack: output has the wrong size");
  const bool scaled = multiplier.size() > 0, biased = bias.size() > 0;
  if ((scaled && multiplier.size() != channels) || (biased && bias.size() != channels))
    throw std::invalid_argument("bitpack: multiplier or bias size");
  const float* x = input.data();
  const float* m = scaled ? multiplier.data() : nullptr;
  const float* b = biased ? bias.data() : nullptr;
  int32_t* out = checked_data<int32_t>(output, -1, true, "bitpack output");
  py::gil_scoped_release release;
  const int chunks = static_cast<int>(std::min<int64_t>(pixels, 256));
  pool().parallel_for(chunks, [&](int begin, int end) {
    const int64_t p0 = pixels * begin / chunks, p1 = pixels * end / chunks;
    pack_pixels(x + p0 * channels, p1 - p0, channels, m, b, out + p0 * words);
  });
}

// A float op's output rows packed as it writes them (the LceQuantize that reads its output, with its
// batch norm, folded in): bits of output pixel i at out + i * words, computed as bitpack computes
// them. Empty (out null) where the op packs nothing.
struct RowPack {
  const float* multiplier = nullptr;
  const float* bias = nullptr;
  int32_t* out = nullptr;
  int words = 0;
  int channels = 0;
  void operator()(const float* rows, int64_t first, int64_t count) const {
    if (out) pack_pixels(rows, count, channels, multiplier, bias, out + first * words);
  }
};

// The RowPack of an op writing `pixels` pixels of `channels` floats, from its optional arguments
// (packed: None or [pixels..., words] int32; multiplier, bias: per channel or empty).
static RowPack row_pack(const py::object& packed, const Array<float>& multiplier, const Array<float>& bias,
                        int64_t pixels, int channels, const char* name) {
  RowPack pack;
  if (packed.is_none()) return pack;
  if (!py::isinstance<py::array>(packed))
    throw std::invalid_argument(std::string(name) + " packed output: expected a C-contiguous int32 array");
  const auto array = py::reinterpret_borrow<py::array>(packed);
  pack.channels = channels;
  pack.words = (channels + 31) / 32;
  pack.out = checked_data<int32_t>(array, -1, true, (std::string(name) + " packed output").c_str());
  if (array.size() != pixels * pack.words)
    throw std::invalid_argument(std::string(name) + ": packed output has the wrong size");
  if ((multiplier.size() > 0 && multiplier.size() != channels) || (bias.size() > 0 && bias.size() != channels))
    throw std::invalid_argument(std::string(name) + ": pack multiplier or bias size");
  pack.multiplier = multiplier.size() > 0 ? multiplier.data() : nullptr;
  pack.bias = bias.size() > 0 ? bias.data() : nullptr;
  return pack;
}

// LceDequantize: bits -> +1 / -1.
static void unpack(Array<int32_t> input, int channels, py::array output) {
  const int words = static_cast<int>(input.shape(input.ndim() - 1));
  const int64_t pixels = input.size() / std::max(words, 1);
  const int32_t* in = input.data();
  float* out = checked_data<float>(output, -1, true, "unpack output");
  if (output.size() != pixels * channels || channels > 32 * words)
    throw std::invalid_argument("unpack: output has the wrong size");
  py::gil_scoped_release release;
  for (int64_t p = 0; p < pixels; ++p)
    for (int c = 0; c < channels; ++c)
      out[p * channels + c] = ((static_cast<uint32_t>(in[p * words + c / 32]) >> (c % 32)) & 1u) ? -1.0f : 1.0f;
}

// ---------------------------------------------------------------------------------------------
// Binary convolution. Weights are prepared once (prepare_binary_weights) as [taps * words_in,
// channels_padded]: for each input word, the words of 64 consecutive output channels side by side,
// so one input word is broadcast against 16 output channels per AVX-512 register.
//
// The input is first copied into a buffer with its padding written out (zero bits, a +1 input), so
// that every tap of every output pixel reads memory inside the buffer: a register tile of P pixels
// of one output row then reads pixel p's (tap, word) k at base[p] + offset[k], with no bounds
// checks. LCE's 0-padding (pad_value 0) is the +1 result corrected on the border pixels only.
constexpr int kBinaryChannelBlock = 64;  // output channels per weight block

static Array<int32_t> prepare_binary_weights(Array<int32_t> filter) {
  // filter: [Cout, fh, fw, words_in] (LCE's layout) -> [fh * fw * words_in, Cout rounded up to 64]
  const int cout = static_cast<int>(filter.shape(0));
  const int k = static_cast<int>(filter.size() / cout);
  const int padded = (cout + kBinaryChannelBlock - 1) / kBinaryChannelBlock * kBinaryChannelBlock;
  Array<int32_t> out = aligned_array<int32_t>({k, padded});
  int32_t* o = data(out);
  std::memset(o, 0, sizeof(int32_t) * k * padded);
  const int32_t* f = filter.data();
  for (int c = 0; c < cout; ++c)
    for (int i = 0; i < k; ++i) o[static_cast<int64_t>(i) * padded + c] = f[static_cast<int64_t>(c) * k + i];
  return out;
}

static inline uint32_t popcount32(uint32_t x) { return static_cast<uint32_t>(__builtin_popcount(x)); }

#if defined(__AVX512F__) && !defined(__AVX512VPOPCNTDQ__)
// Without VPOPCNTDQ a popcount takes 6 vector operations (the XOR's two nibbles masked, looked up
// with vpshufb and added), two of them vpshufb on one port. For longer sums the XORs go through
// carry-save adders first (Harley-Seal, as in Muła, Kurz and Lemire, "Faster population counts
// using AVX2 instructions"): 8 words make `ones`, `twos` and `fours` (bit-sliced counters of weight 1,
// 2 and 4) and one carry of weight 8, whose count is the only look-up of the 8; each adder is two
// vpternlogd (the XOR and the majority of three). About 3.6 operations a word against 6; the
// counters' own counts (three look-ups) are made once a sum. A 4 x 64 tile of one 3x3 convolution
// alone: 256 input channels 1.55x, 128 1.4x, 64 1.1x, 32 0.9x (so sums under 16 words keep the
// direct count).
static inline __attribute__((always_inline)) void carry_save_add(__m512i& sum, __m512i& carry, __m512i a, __m512i b,
                                                                 __m512i c) {
  sum = _mm512_ternarylogic_epi32(a, b, c, 0x96);    // a ^ b ^ c
  carry = _mm512_ternarylogic_epi32(a, b, c, 0xe8);  // at least two of a, b, c
}

// Each byte's set bits, from a table of nibble counts (scaled: the table holds n * popcount).
static inline __attribute__((always_inline)) __m512i byte_counts(__m512i v, __m512i table, __m512i low) {
  return _mm512_add_epi8(_mm512_shuffle_epi8(table, _mm512_and_si512(v, low)),
                         _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi32(v, 4), low)));
}

// N words of a pixel's input (base + offset[i]), each in every lane; their XORs with the weights of
// 16 channels (vector j of a block), word i's at w + i * stride.
template <int N>
static inline __attribute__((always_inline)) void input_words(const int32_t* in, const int32_t* offset,
                                                              __m512i (&x)[N]) {
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) x[i] = _mm512_set1_epi32(in[offset[i]]);
}
template <int N>
static inline __attribute__((always_inline)) void word_xors(const __m512i (&x)[N], const int32_t* w, int64_t stride,
                                                            int j, __m512i (&v)[N]) {
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) v[i] = _mm512_xor_si512(x[i], _mm512_loadu_si512(w + i * stride + 16 * j));
}

// a[p][j] as binary_accumulate's, one pixel at a time (4 counters of NV vectors in registers).
// Byte sums: the weight-8 carries' counts for up to 31 groups (at most 248), the counters' own
// (at most 8 + 16 + 32) with the last words' direct counts (at most 7 * 8), each widened apart.
template <int P, int NV>
static inline __attribute__((always_inline)) void binary_accumulate_carry_save(const int32_t* const* base,
                                                                               const int32_t* offset, int words,
                                                                               const int32_t* weights, int64_t stride,
                                                                               __m512i (&a)[P][NV]) {
  const __m512i table = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
  const __m512i table2 = _mm512_add_epi8(table, table), table4 = _mm512_add_epi8(table2, table2);
  const __m512i low = _mm512_set1_epi8(0x0f), ones8 = _mm512_set1_epi8(1), eights8 = _mm512_set1_epi8(8);
  const __m512i ones16 = _mm512_set1_epi16(1);
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    const int32_t* in = base[p];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) a[p][j] = _mm512_setzero_si512();
    for (int k0 = 0; k0 < words; k0 += 31 * 8) {
      const int k_end = std::min(words, k0 + 31 * 8);
      __m512i ones[NV], twos[NV], fours[NV], eights[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) ones[j] = twos[j] = fours[j] = eights[j] = _mm512_setzero_si512();
      int k = k0;
      for (; k + 8 <= k_end; k += 8) {
        __m512i x[8], v[8];
        input_words(in, offset + k, x);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) {
          word_xors(x, weights + k * stride, stride, j, v);
          __m512i two_a, two_b, four_a, four_b, eight;
          carry_save_add(ones[j], two_a, ones[j], v[0], v[1]);
          carry_save_add(ones[j], two_b, ones[j], v[2], v[3]);
          carry_save_add(twos[j], four_a, twos[j], two_a, two_b);
          carry_save_add(ones[j], two_a, ones[j], v[4], v[5]);
          carry_save_add(ones[j], two_b, ones[j], v[6], v[7]);
          carry_save_add(twos[j], four_b, twos[j], two_a, two_b);
          carry_save_add(fours[j], eight, fours[j], four_a, four_b);
          eights[j] = _mm512_add_epi8(eights[j], byte_counts(eight, table, low));
        }
      }
      if (k_end - k >= 4) {  // half a group: its weight-4 carry into `fours` by a half adder
        __m512i x[4], v[4];
        input_words(in, offset + k, x);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) {
          word_xors(x, weights + k * stride, stride, j, v);
          __m512i two_a, two_b, four;
          carry_save_add(ones[j], two_a, ones[j], v[0], v[1]);
          carry_save_add(ones[j], two_b, ones[j], v[2], v[3]);
          carry_save_add(twos[j], four, twos[j], two_a, two_b);
          const __m512i eight = _mm512_and_si512(fours[j], four);
          fours[j] = _mm512_xor_si512(fours[j], four);
          eights[j] = _mm512_add_epi8(eights[j], byte_counts(eight, table, low));
        }
        k += 4;
      }
      __m512i rest[NV];  // the counters' counts, then the last words' direct ones
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j)
        rest[j] = _mm512_add_epi8(_mm512_add_epi8(byte_counts(ones[j], table, low), byte_counts(twos[j], table2, low)),
                                  byte_counts(fours[j], table4, low));
      for (; k < k_end; ++k) {
        const __m512i x = _mm512_set1_epi32(in[offset[k]]);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j)
          rest[j] = _mm512_add_epi8(
              rest[j], byte_counts(_mm512_xor_si512(x, _mm512_loadu_si512(weights + k * stride + 16 * j)), table, low));
      }
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j)  // 8 * eights + rest, in 16-bit pairs (at most 2 * (1984 + 112)), then 32-bit
        a[p][j] = _mm512_add_epi32(a[p][j], _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(eights[j], eights8),
                                                                               _mm512_maddubs_epi16(rest[j], ones8)),
                                                              ones16));
    }
  }
}
#endif

#if defined(__AVX512F__)
// a[p][j] = sum over k of popcount(base[p][offset[k]] ^ weights[k][16 j .. 16 j + 15]), for P pixels
// and 16 * NV channels (NV = 4, or 2 for a block of at most 32 channels), in registers.
template <int P, int NV>
static inline __attribute__((always_inline)) void binary_accumulate(const int32_t* const* base, const int32_t* offset,
                                                                    int words, const int32_t* weights, int64_t stride,
                                                                    __m512i (&a)[P][NV]) {
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) a[p][j] = _mm512_setzero_si512();
#if defined(__AVX512VPOPCNTDQ__)
  for (int k = 0; k < words; ++k, weights += stride) {
    const int32_t at = offset[k];
    __m512i wv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(weights + 16 * j);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      const __m512i x = _mm512_set1_epi32(base[p][at]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) a[p][j] = _mm512_add_epi32(a[p][j], _mm512_popcnt_epi32(_mm512_xor_si512(x, wv[j])));
    }
  }
#else
  if (words >= 16) {
    binary_accumulate_carry_save<P, NV>(base, offset, words, weights, stride, a);
    return;
  }
  // No VPOPCNTDQ, a short sum: each byte's set bits from a 16-entry table of nibble counts
  // (vpshufb), summed in 8-bit lanes for up to 31 words (at most 31 * 8 = 248), then widened into
  // the 32-bit sums.
  const __m512i table = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
  const __m512i low = _mm512_set1_epi8(0x0f), ones8 = _mm512_set1_epi8(1), ones16 = _mm512_set1_epi16(1);
  for (int k0 = 0; k0 < words; k0 += 31) {
    __m512i bytes[P][NV];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) bytes[p][j] = _mm512_setzero_si512();
    for (int k = k0; k < std::min(words, k0 + 31); ++k, weights += stride) {
      const int32_t at = offset[k];
      // (x ^ w) & 0x0f.. and ((x >> 4) ^ (w >> 4)) & 0x0f.. each in one vpternlogd (imm 0x28:
      // (a ^ b) & c), the shifts made once a word for the weights and once a pixel for the input:
      // 6 operations a vector instead of 8 (xor, two ands, a shift, two vpshufb, two adds)
      __m512i wv[NV], wv4[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        wv[j] = _mm512_loadu_si512(weights + 16 * j);
        wv4[j] = _mm512_srli_epi32(wv[j], 4);
      }
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const __m512i x = _mm512_set1_epi32(base[p][at]);
        const __m512i x4 = _mm512_srli_epi32(x, 4);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) {
          const __m512i lo = _mm512_ternarylogic_epi32(x, wv[j], low, 0x28);
          const __m512i hi = _mm512_ternarylogic_epi32(x4, wv4[j], low, 0x28);
          bytes[p][j] = _mm512_add_epi8(bytes[p][j], _mm512_add_epi8(_mm512_shuffle_epi8(table, lo),
                                                                     _mm512_shuffle_epi8(table, hi)));
        }
      }
    }
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j)
        a[p][j] = _mm512_add_epi32(a[p][j], _mm512_madd_epi16(_mm512_maddubs_epi16(bytes[p][j], ones8), ones16));
  }
#endif
}
#else
#if defined(__AVX2__)
// The AVX2 kernel counts a nibble at a time: for an input nibble v, byte i of table[v] is
// popcount(v ^ i) (i < 16, in both 128-bit lanes), so one vpshufb of table[v] by the nibbles of 32
// channels' weights counts 32 channels' 4 bits of that word. The weights are prepared once as
// their nibbles, one byte each (prepare_weight_nibbles); the input's nibble picks the table with a
// scalar shift and mask. Against counting the XOR of input and weights through the same table
// (xor, two masks, a shift, two vpshufb and two adds a 256-bit vector), that is one vpshufb and one
// add for the same 128 binary MACs, half the vector operations.
struct NibbleCounts {
  alignas(32) uint8_t table[16][32];
  NibbleCounts() {
    for (int v = 0; v < 16; ++v)
      for (int i = 0; i < 32; ++i) table[v][i] = static_cast<uint8_t>(__builtin_popcount(v ^ (i & 15)));
  }
};
static const NibbleCounts kNibbleCounts;

// The byte offset of nibble n's table (n a constant once the loop over n is unrolled): one shift and
// one mask.
static inline __attribute__((always_inline)) uint32_t nibble_offset(uint32_t x, int n) {
  const int shift = 4 * n - 5;  // a table is 32 bytes
  return (shift >= 0 ? x >> shift : x << -shift) & (15u << 5);
}

// weights: prepare_binary_weights' [words, Cout rounded up to 64] -> for each 64-channel block, each
// word k and each nibble n (bits 4n .. 4n + 3), 64 bytes: byte c = that nibble of channel c's word.
static std::vector<uint8_t> prepare_weight_nibbles(const int32_t* weights, int words, int64_t stride) {
  const int64_t blocks = stride / kBinaryChannelBlock;
  std::vector<uint8_t> out(static_cast<size_t>(blocks * words * 8 * kBinaryChannelBlock));
  uint8_t* o = out.data();
  for (int64_t b = 0; b < blocks; ++b)
    for (int k = 0; k < words; ++k)
      for (int n = 0; n < 8; ++n)
        for (int c = 0; c < kBinaryChannelBlock; ++c)
          *o++ = static_cast<uint8_t>((static_cast<uint32_t>(weights[k * stride + b * kBinaryChannelBlock + c]) >> (4 * n)) & 15);
  return out;
}

// acc[p][c] = sum over k of popcount(base[p][offset[k]] ^ weights[k][c]), for P pixels and
// 16 * NV channels (NV = 4, or 2 for a block of at most 32 channels); nibbles: this block's part of
// prepare_weight_nibbles. Byte sums for up to 7 words (a word adds at most 32 to a byte), 16-bit
// sums for up to 2044 words (at most 65408), then the 32-bit accumulators. In a 32-channel block a
// table load serves one vpshufb (two in a 64-channel one): there the nibble form was still
// 1.0-1.1x faster than the XOR form, and 8-pixel tiles 1.2-1.3x more.
template <int P, int NV>
static inline void binary_tile_nibbles(const int32_t* const* base, const int32_t* offset, int words,
                                       const uint8_t* nibbles, int32_t (*acc)[kBinaryChannelBlock]) {
  constexpr int J = NV / 2;  // 32-channel byte vectors
  alignas(32) uint16_t sums[P][32 * J];
  for (int k_outer = 0; k_outer < std::max(words, 1); k_outer += 2044) {
    const int k_outer_end = std::min(words, k_outer + 2044);
    std::memset(sums, 0, sizeof(sums));
    for (int k0 = k_outer; k0 < k_outer_end; k0 += 7) {
      __m256i bytes[P][J];
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 2
        for (int j = 0; j < J; ++j) bytes[p][j] = _mm256_setzero_si256();
      const int k1 = std::min(k_outer_end, k0 + 7);
      for (int k = k0; k < k1; ++k) {
        uint32_t x[P];
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) x[p] = static_cast<uint32_t>(base[p][offset[k]]);
        const uint8_t* w = nibbles + static_cast<int64_t>(k) * 8 * kBinaryChannelBlock;
#pragma GCC unroll 8
        for (int n = 0; n < 8; ++n) {
          __m256i wv[J];
#pragma GCC unroll 2
          for (int j = 0; j < J; ++j)
            wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * kBinaryChannelBlock + 32 * j));
#pragma GCC unroll 8
          for (int p = 0; p < P; ++p) {
            const __m256i t =
                _mm256_load_si256(reinterpret_cast<const __m256i*>(kNibbleCounts.table[0] + nibble_offset(x[p], n)));
#pragma GCC unroll 2
            for (int j = 0; j < J; ++j) {
              bytes[p][j] = _mm256_add_epi8(bytes[p][j], _mm256_shuffle_epi8(t, wv[j]));
              // kept a chain: GCC's reassociation otherwise makes the 8 nibbles' adds a tree whose
              // shuffle results wait on the stack (the kernel ran slower than the XOR form)
              asm("" : "+x"(bytes[p][j]));
            }
          }
        }
      }
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 2
        for (int j = 0; j < J; ++j) {
          __m256i* s = reinterpret_cast<__m256i*>(sums[p] + 32 * j);
          s[0] = _mm256_add_epi16(s[0], _mm256_cvtepu8_epi16(_mm256_castsi256_si128(bytes[p][j])));
          s[1] = _mm256_add_epi16(s[1], _mm256_cvtepu8_epi16(_mm256_extracti128_si256(bytes[p][j], 1)));
        }
    }
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < 32 * J; ++c) acc[p][c] = (k_outer ? acc[p][c] : 0) + sums[p][c];
  }
}
#elif defined(__x86_64__) || defined(__i386__)
// acc[p][c] = sum over k of popcount(base[p][offset[k]] ^ weights[k][c]), for P pixels and
// 16 * NV channels (NV = 4, or 2 for a block of at most 32 channels). Baseline x86 has no popcount
// instruction (__builtin_popcount is a libgcc call a word), so each XOR's bits are counted by
// shifts and masks into its 4 bytes (at most 8 a byte), summed byte-wise over up to 31 words (at
// most 248) and only then added up: plain integer code that the compiler vectorises over the
// channels with SSE2 (the default model's binary convolutions 386 -> 66 ms, 5.8x; here about 14
// SSE2 operations for 4 channels' counts, near what a core issues: SSSE3's byte look-up would be
// the next step, but it is not baseline).
template <int P, int NV>
static inline void binary_tile(const int32_t* const* base, const int32_t* offset, int words, const int32_t* weights,
                               int64_t stride, int32_t (*acc)[kBinaryChannelBlock]) {
  constexpr int kWordsPerByteSum = 31;  // 31 * 8 = 248 fits a byte
  for (int p = 0; p < P; ++p) std::memset(acc[p], 0, sizeof(acc[p]));
  for (int k0 = 0; k0 < words; k0 += kWordsPerByteSum) {
    const int k1 = std::min(words, k0 + kWordsPerByteSum);
    alignas(64) uint32_t bytes[P][16 * NV] = {};
    for (int k = k0; k < k1; ++k, weights += stride)
      for (int p = 0; p < P; ++p) {
        const uint32_t x = static_cast<uint32_t>(base[p][offset[k]]);
        for (int c = 0; c < 16 * NV; ++c) {
          uint32_t v = x ^ static_cast<uint32_t>(weights[c]);
          v -= (v >> 1) & 0x55555555u;
          v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
          bytes[p][c] += (v + (v >> 4)) & 0x0F0F0F0Fu;
        }
      }
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < 16 * NV; ++c) {
        const uint32_t v = (bytes[p][c] & 0x00FF00FFu) + ((bytes[p][c] >> 8) & 0x00FF00FFu);
        acc[p][c] += static_cast<int32_t>((v & 0xFFFFu) + (v >> 16));
      }
  }
}
#else
// acc[p][c] = sum over k of popcount(base[p][offset[k]] ^ weights[k][c]), for P pixels and
// 16 * NV channels (NV = 4, or 2 for a block of at most 32 channels): other CPUs (ARM's) have a
// popcount instruction for __builtin_popcount (not measured here: no ARM machine or cross compiler).
template <int P, int NV>
static inline void binary_tile(const int32_t* const* base, const int32_t* offset, int words, const int32_t* weights,
                               int64_t stride, int32_t (*acc)[kBinaryChannelBlock]) {
  for (int p = 0; p < P; ++p) std::memset(acc[p], 0, sizeof(acc[p]));
  for (int k = 0; k < words; ++k, weights += stride)
    for (int p = 0; p < P; ++p) {
      const uint32_t x = static_cast<uint32_t>(base[p][offset[k]]);
      for (int c = 0; c < 16 * NV; ++c) acc[p][c] += popcount32(x ^ static_cast<uint32_t>(weights[c]));
    }
}
#endif
#endif

// The extent of an input with its padding written out, along one axis: the input after `pad`, or
// as far as the last output's last tap reaches, whichever is larger.
static inline int padded_extent(int pad, int size, int out, int stride, int filter, int dilation) {
  return std::max(pad + size, (out - 1) * stride + (filter - 1) * dilation + 1);
}

struct BinaryConv {
  int channels_in, channels_out, filter_h, filter_w, stride_h, stride_w, dilation_h, dilation_w;
  int pad_top, pad_left, pad_value;  // pad_value 1: pad with +1 (zero bits); 0: pad with 0
};

// What one bconv2d call needs besides its tile size: the padded input, the offsets, the output
// transform. Built once per call, read by every thread.
struct BinaryConvCall {
  BinaryConv g;
  int batch, height, width, words, out_h, out_w, padded_h, padded_w, taps;
  int64_t stride;
  const int32_t* padded;       // [batch, padded_h, padded_w, words]
  std::vector<int32_t> offset;  // [taps * words]: word offset of (tap, word) from a pixel's base
  const int32_t* weights;
  const uint8_t* nibbles;      // the avx2 kernel's weights (prepare_weight_nibbles)
  const float* multiplier;     // 2 * LCE's multiplier where no clamp applies, else LCE's
  const float* bias;
  bool clamped;
  int clamp_min, clamp_max;
  const int32_t* thresholds;   // non-null: bit-packed output
  const int32_t* weight_popcounts;
  float* out_f;                // float output: channels out_offset .. + channels_out of rows out_stride
  int64_t out_stride;          // apart (a part of a channel CONCATENATION), plus `residual` there if
  int out_offset;              // non-null (the ADD after the concatenation)
  const float* residual;
  int32_t* out_b;
  // non-null: the float output's bits for the LceQuantize that reads it, bit = out * next_scale[c]
  // + next_shift[c] < 0 (each optional: a batch norm folded in), rounded as the separate ops round
  int32_t* next_bits;
  const float* next_scale;
  const float* next_shift;
  // int8 output (LCE's: its bias holds the zero point): the float output is q rounded to the int8
  // range, less the zero point (the code the runtime holds); next_bits read that
  bool codes = false;
  float code_zero = 0.0f;
  // int8 output with a residual: the int8 ADD after the concatenation, on codes (residual_add)
  float part_scale = 0.0f, residual_scale = 0.0f, sum_lo = 0.0f, sum_hi = 0.0f;
};

// An int8 tensor's value rounded as TFLite rounds (half away from zero) within [lo, hi]: clamped
// first (a NaN becomes hi), so that the conversions towards zero are exact, then the whole part plus
// the whole part of twice the rest (-1, 0 or 1). The vector forms compute the same, lane by lane.
static inline float rounded(float v, float lo, float hi) {
  v = v < hi ? v : hi;
  v = v > lo ? v : lo;
  const float whole = static_cast<float>(static_cast<int32_t>(v));
  const float rest = v - whole;
  return whole + static_cast<float>(static_cast<int32_t>(rest + rest));
}
#if defined(__AVX512F__)
static inline __m512 rounded(__m512 v, float lo, float hi) {  // v finite; truncated in one instruction
  constexpr int kTowardsZero = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;
  v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(hi)), _mm512_set1_ps(lo));
  const __m512 whole = _mm512_roundscale_ps(v, kTowardsZero);
  const __m512 rest = _mm512_sub_ps(v, whole);
  return _mm512_add_ps(whole, _mm512_roundscale_ps(_mm512_add_ps(rest, rest), kTowardsZero));
}
#endif
#if defined(__AVX2__)
static inline __m256 rounded(__m256 v, float lo, float hi) {  // v finite; truncated in one instruction
  constexpr int kTowardsZero = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;
  v = _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(hi)), _mm256_set1_ps(lo));
  const __m256 whole = _mm256_round_ps(v, kTowardsZero);
  const __m256 rest = _mm256_sub_ps(v, whole);
  return _mm256_add_ps(whole, _mm256_round_ps(_mm256_add_ps(rest, rest), kTowardsZero));
}
#endif

// a * b rounded to a float before anything is added to it: the asm hides the product, which the
// compiler would otherwise contract with a following add into one FMA (GCC's -ffp-contract=fast),
// so that the bits a convolution packs for the next layer are those a separate LceQuantize packs,
// and a binary convolution's float output is LCE's (float(acc) * multiplier, then + bias: its
// aarch64 kernels' fmul and fadd; one FMA instead flips the sign of outputs near zero, which the
// next binary layer reads).
template <typename T>
static inline T rounded_product(T a, T b) {
  T product = a * b;
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(product));
#else
  asm("" : "+m"(product));
#endif
  return product;
}

// An int8 file's ADD of a binary convolution's output (its concatenation's part, code y) and a
// residual (code r), done in the convolution's epilogue: each code rescaled to the ADD's output,
// the two products rounded before they are summed, then rounded into the output's range, as
// requantize's op 1 computes the ADD on its own (the same bits). The scales: BinaryConvCall's, in
// every lane.
template <typename T>
static inline T added_codes(T y, T r, T part_scale, T residual_scale, float lo, float hi) {
  return rounded(rounded_product(y, part_scale) + rounded_product(r, residual_scale), lo, hi);
}

// ---------------------------------------------------------------------------------------------
// An int8 file's arithmetic, on its tensors' codes (q - zero point, held as floats: every value of
// an int8 tensor is an integer there): out = clamp(round(v + add), lo, hi) - subtract, where
//   op 0: v = a * scale[c] + shift[c]  (requantising, QUANTIZE, a MUL or ADD with a constant)
//   op 1: v = a * scale[c] + b * shift[c]  (ADD of two tensors, each rescaled to the output's)
//   op 2: v = a * b * scale[c]  (MUL of two tensors)
// c the channel (scale and shift hold one value per channel: the last axis), b a tensor of a's
// shape. round: half away from zero, TFLite's; `add` and `subtract` say whether q (add the zero
// point, subtract it after) or the code is rounded, as each TFLite or LCE op does; lo and hi the
// range of what is rounded. round false: out = v (DEQUANTIZE). Products then sums, each rounded
// to float32 (no FMA), on every kernel path alike; a NaN becomes hi.
template <int OP, bool ROUND>
__attribute__((optimize("O3", "no-math-errno", "fp-contract=off")))
static void requantize_rows(const float* __restrict x, const float* __restrict y, const float* __restrict s,
                            const float* __restrict t, int64_t r0, int64_t r1, int64_t channels, float add,
                            float lo, float hi, float subtract, float* __restrict o) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * channels;
    const float* yr = OP != 0 ? y + r * channels : nullptr;
    float* orow = o + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      float v;
      if (OP == 0) v = xr[c] * s[c] + t[c];
      else if (OP == 1) v = xr[c] * s[c] + yr[c] * t[c];
      else v = xr[c] * yr[c] * s[c];
      orow[c] = ROUND ? rounded(v + add, lo, hi) - subtract : v;
    }
  }
}

// An int8 file's output requantised by the op that writes it (a convolution), each task's rows as
// they are written, while they are in cache: requantize's op 0 with the same constants (scale and
// shift per channel; add, lo, hi, subtract), so the codes are those of requantize run after it.
struct RowRequantize {
  const float* scale = nullptr;
  const float* shift = nullptr;
  float add = 0.0f, lo = 0.0f, hi = 0.0f, subtract = 0.0f;
  int channels = 0;
  // few channels (an image's 3): runs of `group` rows as one, the constants repeated (scale_group,
  // shift_group), so that the loop over a row is long enough to be vectorised, as requantize does
  int group = 1;
  std::vector<float> scale_group, shift_group;
  // `count` rows of `channels` values from `in` to `out` (which may be `in`)
  void apply(const float* in, float* out, int64_t count) const {
    const int64_t grouped = group > 1 ? count / group : 0, done = grouped * group;
    if (grouped > 0)
      requantize_rows<0, true>(in, nullptr, scale_group.data(), shift_group.data(), 0, grouped,
                               static_cast<int64_t>(group) * channels, add, lo, hi, subtract, out);
    requantize_rows<0, true>(in + done * channels, nullptr, scale, shift, 0, count - done, channels, add, lo, hi,
                             subtract, out + done * channels);
  }
  void operator()(float* rows, int64_t count) const {
    if (scale) apply(rows, rows, count);
  }
};

// The RowRequantize of an op writing `channels` channels, from its optional argument (None, or
// (scale, shift, add, lo, hi, subtract): scale and shift float32 arrays of one value a channel).
static RowRequantize row_requantize(const py::object& spec, int channels, const char* name) {
  RowRequantize requantize;
  if (spec.is_none()) return requantize;
  const auto parts = spec.cast<py::tuple>();
  if (parts.size() != 6) throw std::invalid_argument(std::string(name) + ": requantize needs 6 values");
  // arrays only (a conversion's copy would be gone on return): kept alive by the caller's tuple
  if (!py::isinstance<py::array>(parts[0]) || !py::isinstance<py::array>(parts[1]))
    throw std::invalid_argument(std::string(name) + ": requantize scale and shift must be float32 arrays");
  const auto scale = parts[0].cast<py::array>(), shift = parts[1].cast<py::array>();
  requantize.scale = checked_data<float>(scale, 1, false, (std::string(name) + " requantize scale").c_str());
  requantize.shift = checked_data<float>(shift, 1, false, (std::string(name) + " requantize shift").c_str());
  if (scale.size() != channels || shift.size() != channels)
    throw std::invalid_argument(std::string(name) + ": requantize scale or shift size");
  requantize.add = parts[2].cast<float>();
  requantize.lo = parts[3].cast<float>();
  requantize.hi = parts[4].cast<float>();
  requantize.subtract = parts[5].cast<float>();
  if (!(requantize.lo <= requantize.hi && requantize.lo > -8388608.0f && requantize.hi < 8388608.0f))
    throw std::invalid_argument(std::string(name) + ": requantize range");
  requantize.channels = channels;
  requantize.group = std::max(1, 64 / std::max(channels, 1));
  for (int i = 0; i < requantize.group && requantize.group > 1; ++i) {
    requantize.scale_group.insert(requantize.scale_group.end(), requantize.scale, requantize.scale + channels);
    requantize.shift_group.insert(requantize.shift_group.end(), requantize.shift, requantize.shift + channels);
  }
  return requantize;
}

#if defined(__AVX512F__)
// Channels [c0, c_end) (at most 64) of output pixels first .. first + count - 1 (one tile): the
// accumulators stay in registers through the border correction, the output transform or the
// thresholds, and the stores.
template <int P, int NV, bool Codes>
static inline __attribute__((always_inline)) void bconv2d_block(const BinaryConvCall& c, const int32_t* const* base,
                                                                int count, bool border, int y0, int x0, int64_t first,
                                                                int c0, int c_end) {
  const BinaryConv& g = c.g;
  __m512i a[P][NV];
  binary_accumulate<P, NV>(base, c.offset.data(), c.taps * c.words, c.weights + c0, c.stride, a);
  __mmask16 mask[NV];  // the channels of each vector that exist
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const int left = c_end - c0 - 16 * j;
    mask[j] = static_cast<__mmask16>(left >= 16 ? 0xffffu : left > 0 ? (1u << left) - 1u : 0u);
  }
  if (border) {
    // LCE's reference: an outside tap adds channels_in / 2 (it contributes 0), where the tile
    // counted the weights' set bits (a +1 input).
    const __m512i half = _mm512_set1_epi32(g.channels_in / 2);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      if (p >= count) break;
      for (int fy = 0; fy < g.filter_h; ++fy)
        for (int fx = 0; fx < g.filter_w; ++fx) {
          const int y = y0 + fy * g.dilation_h, x = x0 + p * g.stride_w + fx * g.dilation_w;
          if (y >= 0 && y < c.height && x >= 0 && x < c.width) continue;
          const int32_t* wpop = c.weight_popcounts + static_cast<int64_t>(fy * g.filter_w + fx) * g.channels_out + c0;
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j)
            a[p][j] = _mm512_add_epi32(a[p][j], _mm512_sub_epi32(half, _mm512_maskz_loadu_epi32(mask[j], wpop + 16 * j)));
        }
    }
  }
  if (c.thresholds) {
    const int out_words = (g.channels_out + 31) / 32;
#pragma GCC unroll 2
    for (int j = 0; j < NV; j += 2) {  // one output word: two 16-channel compares
      if (!mask[j]) break;
      const __m512i thr_lo = _mm512_maskz_loadu_epi32(mask[j], c.thresholds + c0 + 16 * j);
      const __m512i thr_hi = _mm512_maskz_loadu_epi32(mask[j + 1], c.thresholds + c0 + 16 * j + 16);
      int32_t* out = c.out_b + first * out_words + (c0 + 16 * j) / 32;
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        if (p >= count) break;
        out[p * out_words] = static_cast<int32_t>(
            _mm512_mask_cmpgt_epi32_mask(mask[j], a[p][j], thr_lo) |
            (static_cast<uint32_t>(_mm512_mask_cmpgt_epi32_mask(mask[j + 1], a[p][j + 1], thr_hi)) << 16));
      }
    }
    return;
  }
  const __m512i lo = _mm512_set1_epi32(c.clamp_min), hi = _mm512_set1_epi32(c.clamp_max);
  uint32_t next[P][2] = {};  // the next layer's bits of this block's 64 channels (c.next_bits)
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    if (!mask[j]) break;
    const int ch = c0 + 16 * j;
    const __m512 mul = _mm512_maskz_loadu_ps(mask[j], c.multiplier + ch), add = _mm512_maskz_loadu_ps(mask[j], c.bias + ch);
    const __m512 next_scale = c.next_scale ? _mm512_maskz_loadu_ps(mask[j], c.next_scale + ch) : _mm512_set1_ps(1.0f);
    const __m512 next_shift = c.next_shift ? _mm512_maskz_loadu_ps(mask[j], c.next_shift + ch) : _mm512_setzero_ps();
    float* out = c.out_f + first * c.out_stride + c.out_offset + ch;
    const float* residual = c.residual ? c.residual + first * c.out_stride + c.out_offset + ch : nullptr;
    const __m512 part_scale = _mm512_set1_ps(c.part_scale), residual_scale = _mm512_set1_ps(c.residual_scale);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      if (p >= count) break;
      __m512i v = a[p][j];
      if (c.clamped) v = _mm512_min_epi32(_mm512_max_epi32(_mm512_slli_epi32(v, 1), lo), hi);
      __m512 y = _mm512_add_ps(rounded_product(_mm512_cvtepi32_ps(v), mul), add);  // see output_zero_point
      if (Codes) y = _mm512_sub_ps(rounded(y, -128.0f, 127.0f), _mm512_set1_ps(c.code_zero));
      __m512 stored = y;
      if (residual) {
        const __m512 r = _mm512_maskz_loadu_ps(mask[j], residual + p * c.out_stride);
        stored = Codes ? added_codes(y, r, part_scale, residual_scale, c.sum_lo, c.sum_hi) : _mm512_add_ps(y, r);
      }
      if (mask[j] == 0xffffu)
        _mm512_storeu_ps(out + p * c.out_stride, stored);
      else
        _mm512_mask_storeu_ps(out + p * c.out_stride, mask[j], stored);
      if (c.next_bits) {
        __m512 q = c.next_scale ? rounded_product(y, next_scale) : y;
        if (c.next_shift) q = _mm512_add_ps(q, next_shift);
        next[p][j >> 1] |= static_cast<uint32_t>(_mm512_mask_cmp_ps_mask(mask[j], q, _mm512_setzero_ps(), _CMP_LT_OQ))
                           << (16 * (j & 1));
      }
    }
  }
  if (c.next_bits) {
    const int next_words = (g.channels_out + 31) / 32, words = (c_end - c0 + 31) / 32;
    for (int p = 0; p < count; ++p)
      for (int w = 0; w < words; ++w) c.next_bits[(first + p) * next_words + c0 / 32 + w] = static_cast<int32_t>(next[p][w]);
  }
}
#endif

// One tile: output pixels first .. first + count - 1 (at most P, of one output row whose taps start
// at base[p]; y0, x0: the input position of the tile's first tap), every 64-channel block, then the
// output transform (float) or thresholds (bit-packed). `border`: some tap of the tile falls in the
// padding and the padding is 0 (LCE's pad value 0), so it needs the border correction. Codes:
// c.codes (an int8 output), a compile-time constant so that the float outputs' epilogue carries no
// test for it (a test per vector cost them 2-7% per shape).
template <int P, bool Codes>
static inline void bconv2d_tile(const BinaryConvCall& c, const int32_t* const* base, int count, bool border, int y0,
                                int x0, int64_t first) {
  const BinaryConv& g = c.g;
#if defined(__AVX512F__)
  for (int c0 = 0; c0 < g.channels_out; c0 += kBinaryChannelBlock) {
    const int c_end = std::min(g.channels_out, c0 + kBinaryChannelBlock);
    if (c_end - c0 <= 32)
      bconv2d_block<P, 2, Codes>(c, base, count, border, y0, x0, first, c0, c_end);
    else
      bconv2d_block<P, 4, Codes>(c, base, count, border, y0, x0, first, c0, c_end);
  }
#else
  const int out_words = (g.channels_out + 31) / 32;
  alignas(64) int32_t acc[P][kBinaryChannelBlock];
  for (int c0 = 0; c0 < g.channels_out; c0 += kBinaryChannelBlock) {
    const int c_end = std::min(g.channels_out, c0 + kBinaryChannelBlock);
    if (c_end - c0 <= 32)
#if defined(__AVX2__)
      binary_tile_nibbles<P, 2>(base, c.offset.data(), c.taps * c.words, c.nibbles + c0 * 8 * c.taps * c.words, acc);
    else
      binary_tile_nibbles<P, 4>(base, c.offset.data(), c.taps * c.words, c.nibbles + c0 * 8 * c.taps * c.words, acc);
#else
      binary_tile<P, 2>(base, c.offset.data(), c.taps * c.words, c.weights + c0, c.stride, acc);
    else
      binary_tile<P, 4>(base, c.offset.data(), c.taps * c.words, c.weights + c0, c.stride, acc);
#endif
    if (border) {
      // LCE's reference: an outside tap adds channels_in / 2 (it contributes 0), where the tile
      // counted the weights' set bits (a +1 input).
      for (int p = 0; p < count; ++p)
        for (int fy = 0; fy < g.filter_h; ++fy)
          for (int fx = 0; fx < g.filter_w; ++fx) {
            const int y = y0 + fy * g.dilation_h, x = x0 + p * g.stride_w + fx * g.dilation_w;
            if (y >= 0 && y < c.height && x >= 0 && x < c.width) continue;
            const int32_t* wpop = c.weight_popcounts + static_cast<int64_t>(fy * g.filter_w + fx) * g.channels_out;
            for (int ch = c0; ch < c_end; ++ch) acc[p][ch - c0] += g.channels_in / 2 - wpop[ch];
          }
    }
    for (int p = 0; p < count; ++p) {
      if (c.thresholds) {
        uint32_t* bits = reinterpret_cast<uint32_t*>(c.out_b + (first + p) * out_words);
        int ch = c0;
#if defined(__AVX2__)
        for (; ch + 8 <= c_end; ch += 8) {  // 8 channels' bits a compare
          const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc[p] + ch - c0));
          const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.thresholds + ch));
          if (ch % 32 == 0) bits[ch / 32] = 0;
          bits[ch / 32] |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, t))))
                           << (ch % 32);
        }
#endif
        for (; ch < c_end; ++ch) {
          if (ch % 32 == 0) bits[ch / 32] = 0;
          bits[ch / 32] |= static_cast<uint32_t>(acc[p][ch - c0] > c.thresholds[ch]) << (ch % 32);
        }
      } else {
        float* o = c.out_f + (first + p) * c.out_stride + c.out_offset;
        const float* r = c.residual ? c.residual + (first + p) * c.out_stride + c.out_offset : nullptr;
        uint32_t* bits = c.next_bits ? reinterpret_cast<uint32_t*>(c.next_bits + (first + p) * out_words) : nullptr;
        int ch = c0;
#if defined(__AVX2__)
        // 8 channels a vector, as the scalar loop below computes them (the product rounded before
        // the bias is added, as LCE's kernels do: its aarch64 ones by fmul then fadd)
        const __m256i lo = _mm256_set1_epi32(c.clamp_min), hi = _mm256_set1_epi32(c.clamp_max);
        for (; ch + 8 <= c_end; ch += 8) {
          __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc[p] + ch - c0));
          if (c.clamped) v = _mm256_min_epi32(_mm256_max_epi32(_mm256_slli_epi32(v, 1), lo), hi);
          const __m256 mul = _mm256_loadu_ps(c.multiplier + ch), add = _mm256_loadu_ps(c.bias + ch);
          __m256 y = _mm256_add_ps(rounded_product(_mm256_cvtepi32_ps(v), mul), add);  // output_zero_point
          if (Codes) y = _mm256_sub_ps(rounded(y, -128.0f, 127.0f), _mm256_set1_ps(c.code_zero));
          __m256 stored = y;
          if (r)
            stored = Codes ? added_codes(y, _mm256_loadu_ps(r + ch), _mm256_set1_ps(c.part_scale),
                                         _mm256_set1_ps(c.residual_scale), c.sum_lo, c.sum_hi)
                           : _mm256_add_ps(y, _mm256_loadu_ps(r + ch));
          _mm256_storeu_ps(o + ch, stored);
          if (bits) {
            __m256 q = c.next_scale ? rounded_product(y, _mm256_loadu_ps(c.next_scale + ch)) : y;
            if (c.next_shift) q = _mm256_add_ps(q, _mm256_loadu_ps(c.next_shift + ch));
            if (ch % 32 == 0) bits[ch / 32] = 0;
            bits[ch / 32] |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(q, _mm256_setzero_ps(), _CMP_LT_OQ)))
                             << (ch % 32);
          }
        }
#endif
        for (; ch < c_end; ++ch) {
          const int32_t a = acc[p][ch - c0];
          const int32_t v = c.clamped ? std::min(std::max(a * 2, c.clamp_min), c.clamp_max) : a;
          float y = rounded_product(static_cast<float>(v), c.multiplier[ch]) + c.bias[ch];  // output_zero_point
          if (Codes) y = rounded(y, -128.0f, 127.0f) - c.code_zero;
          if (r)
            o[ch] = Codes ? added_codes(y, r[ch], c.part_scale, c.residual_scale, c.sum_lo, c.sum_hi) : y + r[ch];
          else
            o[ch] = y;
          if (bits) {  // from the convolution's output, as the LceQuantize reads it
            float q = c.next_scale ? rounded_product(y, c.next_scale[ch]) : y;
            if (c.next_shift) q = q + c.next_shift[ch];
            if (ch % 32 == 0) bits[ch / 32] = 0;
            bits[ch / 32] |= static_cast<uint32_t>(q < 0.0f) << (ch % 32);
          }
        }
      }
    }
  }
#endif
}

// Tiles [t0, t1) of P pixels, row_tiles to an output row: the tile's pixel pointers advance by P
// pixels from one tile of a row to the next, and a row's vertical border test is made once (per
// tile set-up taken out of the loop: 3-11% on the 32- and 64-channel shapes).
template <int P, bool Codes>
static void bconv2d_tiles(const BinaryConvCall& c, int64_t t0, int64_t t1, int row_tiles) {
  const BinaryConv& g = c.g;
  const int64_t step = static_cast<int64_t>(P) * g.stride_w * c.words;
  for (int64_t t = t0; t < t1;) {
    const int64_t row = t / row_tiles, row_end = std::min<int64_t>(t1, (row + 1) * row_tiles);
    const int b = static_cast<int>(row / c.out_h), oy = static_cast<int>(row % c.out_h);
    const int32_t* row_base =
        c.padded + (static_cast<int64_t>(b) * c.padded_h + static_cast<int64_t>(oy) * g.stride_h) * c.padded_w * c.words;
    const int y0 = oy * g.stride_h - g.pad_top;
    const bool row_border = g.pad_value == 0 && (y0 < 0 || y0 + (g.filter_h - 1) * g.dilation_h >= c.height);
    int ox0 = static_cast<int>(t - row * row_tiles) * P;
    const int32_t* base[P];
    for (int p = 0; p < P; ++p) base[p] = row_base + static_cast<int64_t>(ox0 + p) * g.stride_w * c.words;
    for (; t < row_end; ++t, ox0 += P) {
      const int count = std::min(P, c.out_w - ox0);
      for (int p = count; p < P; ++p) base[p] = base[count - 1];  // a short tile repeats its last pixel
      const int x0 = ox0 * g.stride_w - g.pad_left;
      const bool border =
          row_border || (g.pad_value == 0 &&
                         (x0 < 0 || x0 + (count - 1) * g.stride_w + (g.filter_w - 1) * g.dilation_w >= c.width));
      bconv2d_tile<P, Codes>(c, base, count, border, y0, x0, row * c.out_w + ox0);
      for (int p = 0; p < P; ++p) base[p] += step;
    }
  }
}

// LceBconv2d with its constants prepared once; calling it runs the convolution on one input:
//   out (float): float(clamp(2 * acc, clamp_min, clamp_max)) * multiplier[c] + bias[c]   (LCE's form)
//   out (bit-packed, thresholds given): bit = acc > thresholds[c]
// pack_next (float output): a call also writes next_bits, the bits of the LceQuantize that reads
// out, bit = out * next_scale[c] + next_shift[c] < 0 (a batch norm folded in; each may be empty),
// rounded as the separate ops round: that LceQuantize's pass over the output is saved.
// output_zero_point (one value: an int8 output, its multiplier and bias LCE's for it): the output
// is q = round(out) clamped to [-128, 127], less that zero point (the runtime's int8 codes), out's
// product rounded before the bias is added, as LCE computes it (one FMA's single rounding put
// values near a half on the other code: 7% of a ste_sign network's outputs at a 2x2 layer).
// residual_add (an int8 output with a residual: part scale, residual scale, low, high): the int8 ADD
// after the concatenation, clamp(round(code * part scale + residual * residual scale), low, high)
// on codes (added_codes; the range in codes of the ADD's output).
// channel_offset (not None), residual: the output is the part of a channel
// CONCATENATION at channels channel_offset .. + channels_out of `output` (which may be wider),
// with the ADD that follows it fused in where residual is given (out + residual, or residual_add's
// sum of codes; residual shaped as output): the part is never written on its own.
// weights: prepare_binary_weights(filter). geometry: channels_in, channels_out, filter_h, filter_w,
// stride_h, stride_w, dilation_h, dilation_w, pad_value. A call passes the input, the output and
// the padding before the first row and column (they follow from the input's size); nothing else is
// converted per call (the constants' conversion took 2-3 us a call, most of a 4x4 layer's time).
class BinaryConv2D {
 public:
  BinaryConv2D(Array<int32_t> weights, std::vector<int> geometry, Array<float> multiplier, Array<float> bias,
               int clamp_min, int clamp_max, Array<int32_t> thresholds, Array<int32_t> weight_popcounts,
               Array<float> next_scale, Array<float> next_shift, bool pack_next,
               std::vector<float> output_zero_point = {}, std::vector<float> residual_add = {})
      : weights_(weights), bias_(bias), thresholds_(thresholds), weight_popcounts_(weight_popcounts),
        next_scale_(next_scale), next_shift_(next_shift), pack_next_(pack_next),
        codes_(!output_zero_point.empty()), code_zero_(codes_ ? output_zero_point[0] : 0.0f),
        residual_add_(residual_add) {
    if (geometry.size() != 9) throw std::invalid_argument("binary_conv2d: geometry needs 9 numbers");
    g_ = BinaryConv{geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5],
                    geometry[6], geometry[7], 0, 0, geometry[8]};
    taps_ = g_.filter_h * g_.filter_w;
    words_ = (g_.channels_in + 31) / 32;
    if (g_.channels_in <= 0 || g_.channels_out <= 0 || taps_ <= 0 || g_.stride_h <= 0 || g_.stride_w <= 0 ||
        g_.dilation_h <= 0 || g_.dilation_w <= 0)
      throw std::invalid_argument("binary_conv2d: channels, filter size, strides and dilations must be positive");
    if (weights.ndim() != 2 || weights.shape(0) != static_cast<int64_t>(taps_) * words_ ||
        weights.shape(1) < g_.channels_out || weights.shape(1) % kBinaryChannelBlock != 0)
      throw std::invalid_argument("binary_conv2d: weights are not prepare_binary_weights of this geometry");
    if (weight_popcounts.size() != static_cast<int64_t>(taps_) * g_.channels_out)
      throw std::invalid_argument("binary_conv2d: weight_popcounts needs taps * channels_out values");
    packed_ = thresholds.size() > 0;
    if (packed_ ? thresholds.size() != g_.channels_out
                : (multiplier.size() != g_.channels_out || bias.size() != g_.channels_out))
      throw std::invalid_argument("binary_conv2d: thresholds, or multiplier and bias, need channels_out values");
    if (pack_next && packed_) throw std::invalid_argument("binary_conv2d: pack_next needs a float output");
    if (codes_ && (packed_ || output_zero_point.size() != 1))
      throw std::invalid_argument("binary_conv2d: output_zero_point (int8 output) needs one value and a float output");
    if (!residual_add.empty() && (!codes_ || residual_add.size() != 4 || !(residual_add[2] <= residual_add[3]) ||
                                  residual_add[2] < -255.0f || residual_add[3] > 255.0f))
      throw std::invalid_argument("binary_conv2d: residual_add needs an int8 output and 4 values (part scale, "
                                  "residual scale, low, high; low <= high, within the codes' range)");
    if ((next_scale.size() != 0 && next_scale.size() != g_.channels_out) ||
        (next_shift.size() != 0 && next_shift.size() != g_.channels_out))
      throw std::invalid_argument("binary_conv2d: next_scale and next_shift need channels_out values or none");
    // 2 * acc stays in [0, 2 * channels_in * taps]: a clamp that holds all of it does nothing, and
    // then float(2 * acc) * m == float(acc) * (2 * m) exactly (scaling by 2 is exact).
    clamp_min_ = clamp_min;
    clamp_max_ = clamp_max;
    clamped_ = !(clamp_min <= 0 && static_cast<int64_t>(clamp_max) >= 2LL * g_.channels_in * taps_);
#if defined(__AVX2__) && !defined(__AVX512F__)
    nibbles_ = prepare_weight_nibbles(weights.data(), taps_ * words_, weights.shape(1));
#endif
    if (!packed_) {
      multiplier_.assign(multiplier.data(), multiplier.data() + g_.channels_out);
      if (!clamped_)
        for (float& m : multiplier_) m *= 2.0f;
    }
  }

  void operator()(const py::array& input, const py::array& output, int pad_top, int pad_left,
                  const py::object& next_bits, const py::object& channel_offset, const py::object& residual) const {
    BinaryConvCall c;
    c.g = g_;
    c.g.pad_top = pad_top;
    c.g.pad_left = pad_left;
    const BinaryConv& g = c.g;
    const int32_t* in = checked_data<int32_t>(input, 4, false, "binary_conv2d input");
    void* out = packed_ ? static_cast<void*>(checked_data<int32_t>(output, 4, true, "binary_conv2d output (bit-packed)"))
                        : static_cast<void*>(checked_data<float>(output, 4, true, "binary_conv2d output (float)"));
    c.batch = static_cast<int>(input.shape(0));
    c.height = static_cast<int>(input.shape(1));
    c.width = static_cast<int>(input.shape(2));
    c.words = static_cast<int>(input.shape(3));
    c.out_h = static_cast<int>(output.shape(1));
    c.out_w = static_cast<int>(output.shape(2));
    c.taps = taps_;
    c.stride = weights_.shape(1);
    if (c.words != words_) throw std::invalid_argument("binary_conv2d: input words per pixel != ceil(channels_in / 32)");
    // with channel_offset, a float output is a part of a wider tensor (a concatenation)
    const bool part = !channel_offset.is_none();
    const int offset = part ? channel_offset.cast<int>() : 0;
    if (output.shape(0) != c.batch || (packed_ && (part || !residual.is_none())) ||
        (part ? offset < 0 || offset + g.channels_out > output.shape(3)
              : output.shape(3) != (packed_ ? (g.channels_out + 31) / 32 : g.channels_out)))
      throw std::invalid_argument("binary_conv2d: output batch or channels");
    c.out_stride = output.shape(3);
    c.out_offset = offset;
    c.residual = nullptr;
    if (!residual.is_none()) {
      const py::array r = residual.cast<py::array>();
      c.residual = checked_data<float>(r, 4, false, "binary_conv2d residual");
      for (int axis = 0; axis < 4; ++axis)
        if (r.shape(axis) != output.shape(axis)) throw std::invalid_argument("binary_conv2d: residual shape != output shape");
    }
    if (pad_top < 0 || pad_left < 0) throw std::invalid_argument("binary_conv2d: negative padding");
    c.next_bits = nullptr;
    c.next_scale = next_scale_.size() ? next_scale_.data() : nullptr;
    c.next_shift = next_shift_.size() ? next_shift_.data() : nullptr;
    if (pack_next_ != !next_bits.is_none())
      throw std::invalid_argument(pack_next_ ? "binary_conv2d: next_bits missing (made with pack_next)"
                                             : "binary_conv2d: next_bits given without pack_next");
    if (pack_next_) {
      const py::array bits = next_bits.cast<py::array>();
      c.next_bits = checked_data<int32_t>(bits, 4, true, "binary_conv2d next_bits");
      for (int axis = 0; axis < 3; ++axis)
        if (bits.shape(axis) != output.shape(axis)) throw std::invalid_argument("binary_conv2d: next_bits shape");
      if (bits.shape(3) != (g.channels_out + 31) / 32) throw std::invalid_argument("binary_conv2d: next_bits words");
    }
    if (c.out_h <= 0 || c.out_w <= 0 || c.batch <= 0) return;
    c.weights = weights_.data();
#if defined(__AVX2__) && !defined(__AVX512F__)
    c.nibbles = nibbles_.data();
#else
    c.nibbles = nullptr;
#endif
    c.thresholds = packed_ ? thresholds_.data() : nullptr;
    c.weight_popcounts = weight_popcounts_.data();
    c.out_f = packed_ ? nullptr : static_cast<float*>(out);
    c.out_b = packed_ ? static_cast<int32_t*>(out) : nullptr;
    c.clamp_min = clamp_min_;
    c.clamp_max = clamp_max_;
    c.clamped = clamped_;
    c.codes = codes_;
    c.code_zero = code_zero_;
    if (codes_ && c.residual && residual_add_.empty())
      throw std::invalid_argument("binary_conv2d: a residual for an int8 output needs residual_add");
    if (!residual_add_.empty()) {
      c.part_scale = residual_add_[0];
      c.residual_scale = residual_add_[1];
      c.sum_lo = residual_add_[2];
      c.sum_hi = residual_add_[3];
    }
    c.multiplier = packed_ ? nullptr : multiplier_.data();
    c.bias = packed_ ? nullptr : bias_.data();
    // the padded input: rows [pad_top, pad_top + height) and columns [pad_left, pad_left + width)
    // hold the input; the rest is zero bits
    c.padded_h = padded_extent(g.pad_top, c.height, c.out_h, g.stride_h, g.filter_h, g.dilation_h);
    c.padded_w = padded_extent(g.pad_left, c.width, c.out_w, g.stride_w, g.filter_w, g.dilation_w);
    // scratch kept between calls (per calling thread): no allocation, and no page faults on a large
    // buffer, per call
    static thread_local std::vector<int32_t> padded;
    if (g.pad_top == 0 && g.pad_left == 0 && c.padded_h == c.height && c.padded_w == c.width) {
      c.padded = in;
    } else {
      padded.assign(static_cast<size_t>(c.batch) * c.padded_h * c.padded_w * c.words, 0);
      for (int b = 0; b < c.batch; ++b)
        for (int y = 0; y < c.height; ++y)
          std::memcpy(padded.data() + ((static_cast<int64_t>(b) * c.padded_h + y + g.pad_top) * c.padded_w + g.pad_left) * c.words,
                      in + (static_cast<int64_t>(b) * c.height + y) * c.width * c.words,
                      sizeof(int32_t) * c.width * c.words);
      c.padded = padded.data();
    }
    c.offset.resize(static_cast<size_t>(c.taps) * c.words);
    for (int fy = 0; fy < g.filter_h; ++fy)
      for (int fx = 0; fx < g.filter_w; ++fx)
        for (int w = 0; w < c.words; ++w)
          c.offset[(fy * g.filter_w + fx) * c.words + w] =
              (fy * g.dilation_h * c.padded_w + fx * g.dilation_w) * c.words + w;
#if defined(__AVX512F__) || defined(__AVX2__)
    // 8 pixels x 32 channels or 4 x 64 (AVX-512: 16 accumulators; AVX2: 10 or 11 registers of byte
    // sums, weights and table); short rows take 4
    const int tile = (g.channels_out <= 32 && c.out_w >= 8) ? 8 : 4;
#else
    const int tile = 4;  // 8 was 10% slower
#endif
    const int row_tiles = (c.out_w + tile - 1) / tile;
    const int64_t tiles = static_cast<int64_t>(c.batch) * c.out_h * row_tiles;
    py::gil_scoped_release release;
    pool().parallel_for(static_cast<int>(tiles), [&](int t0, int t1) {
      if (tile == 8)
        c.codes ? bconv2d_tiles<8, true>(c, t0, t1, row_tiles) : bconv2d_tiles<8, false>(c, t0, t1, row_tiles);
      else
        c.codes ? bconv2d_tiles<4, true>(c, t0, t1, row_tiles) : bconv2d_tiles<4, false>(c, t0, t1, row_tiles);
    });
  }

 private:
  BinaryConv g_;
  int taps_, words_;
  bool packed_, clamped_;
  int clamp_min_, clamp_max_;
  Array<int32_t> weights_;
  std::vector<uint8_t> nibbles_;  // the avx2 kernel's weights
  std::vector<float> multiplier_;  // 2 * LCE's multiplier where no clamp applies, else LCE's
  Array<float> bias_;
  Array<int32_t> thresholds_, weight_popcounts_;
  Array<float> next_scale_, next_shift_;
  bool pack_next_;
  bool codes_;  // int8 output: BinaryConvCall::codes
  float code_zero_;
  std::vector<float> residual_add_;  // part scale, residual scale, low, high (an int8 output's ADD), or none
};

// ---------------------------------------------------------------------------------------------
// Float convolution: im2col (only when the filter is not 1x1 stride 1) and a register-tiled GEMM
// C[P, Cout] = A[P, K] B[K, Cout] + bias with the fused activation clamp. B is prepared once as
// [K, Cout rounded up to kFloatTileN].
// 6 rows a tile on every path: on AVX2 (and SSE2) 6 x 16 columns, 12 accumulators of the 16
// registers, where 4 x 16 (8 accumulators, just enough chains for the FMA's latency) left the
// float32 convolutions 1.15-1.22x slower
constexpr int kFloatTileM = 6;
constexpr int kFloatVectors = (kFloatLanes == 16) ? 4 : 2;
constexpr int kFloatTileN = kFloatLanes * kFloatVectors;

// The rows of the bfloat16 and VNNI-form int8 weights (pairs or quads of K values a row): K's rounded
// up to a multiple of 16 with zero weights, so that AMX's tiles (64 bytes of K a row) read whole
// tiles of B whatever K is (gemm_rows_amx).
static constexpr int weight_rows(int k_groups) { return (k_groups + 15) / 16 * 16; }

static Array<float> prepare_float_weights(Array<float> filter) {
  // filter: [Cout, fh, fw, Cin] (TFLite) -> [fh * fw * Cin, Cout rounded up]
  const int cout = static_cast<int>(filter.shape(0));
  const int k = static_cast<int>(filter.size() / cout);
  const int padded = (cout + kFloatTileN - 1) / kFloatTileN * kFloatTileN;
  Array<float> out = aligned_array<float>({k, padded});
  float* o = data(out);
  std::memset(o, 0, sizeof(float) * k * padded);
  const float* f = filter.data();
  for (int c = 0; c < cout; ++c)
    for (int i = 0; i < k; ++i) o[static_cast<int64_t>(i) * padded + c] = f[static_cast<int64_t>(c) * k + i];
  return out;
}

static inline vfloat load_v(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store_v(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// The residual added after a convolution: its channels may lie in several tensors (a channel
// CONCATENATION folded in), each part a multiple of 16 channels wide unless there is one part.
// Channel group q (channels 16 q .. 16 q + 15) of pixel r is at group[q] + r * width[q].
struct Residual {
  std::vector<const float*> group;
  std::vector<int64_t> width;
  const float* at(int64_t row, int channel) const {
    return group[channel / 16] + row * width[channel / 16] + channel % 16;
  }
};

// Where the K values of one GEMM row lie: `length` consecutive floats at each of `offset` from the
// row's base, in order. A 1x1 convolution: one run of Cin at 0; any other: the filter's taps read
// straight from the padded input (one run of fw * Cin per filter row when dilation_w is 1), so
// no im2col copy is made.
struct Segments {
  std::vector<int64_t> offset;
  int length;
};

#if defined(__AVX512F__)
// The residual of a 6 x (16 NV) tile's rows row .. row + m - 1 and columns c0 .. c0 + n - 1: each
// vector's pointer at the first row and its row stride, found once a tile (residual_at[j],
// residual_width[j]; looked up a row and vector at a time they were read again after every store,
// which may alias them: 1.92-2.00 -> 1.74-1.79 ms on the default model's 128x128 1x1 convolution
// with its batch norm and residual), and asked for before the tile's products so that the epilogue
// finds it in the cache (the same convolution with its pool: 2.6-2.8 -> 2.1-2.2 ms; on the AVX2
// tiles, 4 x 16, the same made the convolutions slower).
#define GEMM_TILE_PREFETCH_RESIDUAL                                                                         \
  const float* residual_at[4] = {};                                                                         \
  int64_t residual_width[4] = {};                                                                           \
  if (residual)                                                                                             \
    for (int j = 0; j < NV && 16 * j < n; ++j) {                                                            \
      residual_at[j] = residual->at(row, c0 + 16 * j);                                                      \
      residual_width[j] = residual->width[(c0 + 16 * j) / 16];                                              \
      for (int i = 0; i < m; ++i) __builtin_prefetch(residual_at[j] + i * residual_width[j]);              \
    }

// A tile's epilogue on its accumulators c00 .. c53 (row i, vector j): bias, residual and clamp, with
// masked loads and stores for the last columns.
#define GEMM_TILE_EPILOGUE                                                                                  \
  __mmask16 mask[4];                                                                                        \
  __m512 bias_v[4];                                                                                         \
  for (int j = 0; j < 4; ++j) {                                                                             \
    const int left = std::max(0, std::min(16, n - 16 * j));                                                 \
    mask[j] = static_cast<__mmask16>((1u << left) - 1u);                                                    \
    bias_v[j] = _mm512_maskz_loadu_ps(mask[j], bias + c0 + 16 * j);                                         \
  }                                                                                                         \
  const __m512 lo_v = _mm512_set1_ps(lo), hi_v = _mm512_set1_ps(hi);                                        \
  auto finish = [&](int i, int j, __m512 v) {                                                               \
    v = _mm512_add_ps(v, bias_v[j]);                                                                        \
    const int64_t at = static_cast<int64_t>(i) * cout + c0 + 16 * j;                                        \
    if (residual && mask[j])                                                                                \
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[j], residual_at[j] + i * residual_width[j]));        \
    /* max / min return their second operand when either is NaN: NaN passes through, as in TFLite */        \
    _mm512_mask_storeu_ps(c + at, mask[j], _mm512_min_ps(hi_v, _mm512_max_ps(lo_v, v)));                    \
  };                                                                                                        \
  if (0 < m) { finish(0, 0, c00); if (NV > 1) finish(0, 1, c01); if (NV > 2) finish(0, 2, c02); if (NV > 3) finish(0, 3, c03); } \
  if (1 < m) { finish(1, 0, c10); if (NV > 1) finish(1, 1, c11); if (NV > 2) finish(1, 2, c12); if (NV > 3) finish(1, 3, c13); } \
  if (2 < m) { finish(2, 0, c20); if (NV > 1) finish(2, 1, c21); if (NV > 2) finish(2, 2, c22); if (NV > 3) finish(2, 3, c23); } \
  if (3 < m) { finish(3, 0, c30); if (NV > 1) finish(3, 1, c31); if (NV > 2) finish(3, 2, c32); if (NV > 3) finish(3, 3, c33); } \
  if (4 < m) { finish(4, 0, c40); if (NV > 1) finish(4, 1, c41); if (NV > 2) finish(4, 2, c42); if (NV > 3) finish(4, 3, c43); } \
  if (5 < m) { finish(5, 0, c50); if (NV > 1) finish(5, 1, c51); if (NV > 2) finish(5, 2, c52); if (NV > 3) finish(5, 3, c53); }

// One 6 x (16 NV) tile of gemm_rows (NV = 4, or fewer for the last columns): rows arow[0 .. m - 1],
// columns c0 .. c0 + n - 1, in 24 named registers (an array of vectors made GCC spill to the stack);
// the epilogue (bias, residual, clamp) runs on the registers with masked loads and stores.
template <int NV>
static inline __attribute__((always_inline)) void gemm_tile(const float* const* arow, int m, const Segments& segments,
                                                            const float* bp, int64_t ldb, int c0, int n,
                                                            const float* bias, const Residual* residual, int64_t row,
                                                            float lo, float hi, float* c, int cout) {
  GEMM_TILE_PREFETCH_RESIDUAL
#define ROW(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
  ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
  for (const int64_t offset : segments.offset) {
    const float* a_row[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) a_row[i] = arow[i] + offset;
    for (int kk = 0; kk < segments.length; ++kk, bp += ldb) {
      const __m512 b0 = _mm512_loadu_ps(bp);
      const __m512 b1 = NV > 1 ? _mm512_loadu_ps(bp + 16) : b0;
      const __m512 b2 = NV > 2 ? _mm512_loadu_ps(bp + 32) : b0;
      const __m512 b3 = NV > 3 ? _mm512_loadu_ps(bp + 48) : b0;
#define ROW(i)                                                \
  {                                                           \
    const __m512 a = _mm512_set1_ps(a_row[i][kk]);            \
    c##i##0 = _mm512_fmadd_ps(a, b0, c##i##0);                \
    if (NV > 1) c##i##1 = _mm512_fmadd_ps(a, b1, c##i##1);    \
    if (NV > 2) c##i##2 = _mm512_fmadd_ps(a, b2, c##i##2);    \
    if (NV > 3) c##i##3 = _mm512_fmadd_ps(a, b3, c##i##3);    \
  }
      ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
  }
  GEMM_TILE_EPILOGUE
}

// [sum of a's lanes, b's, c's, d's]
static inline __m128 lane_sums(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto halves = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 ab = _mm256_hadd_ps(halves(a), halves(b)), cd = _mm256_hadd_ps(halves(c), halves(d));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit lane: a, b, c, d's partial sums
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// The last n <= T columns of a GEMM whose channel count is 1 to 8 past a multiple of 64 (the default
// model's 68 heatmaps): gemm_tile<1> would spend 16 lanes on them, in 6 accumulator chains that wait
// on the FMA's latency (256 -> 68: 1.20 ms against 0.88 for 256 -> 64). Here each of R rows' dot
// product with each of the T columns runs along K, 16 of its values a lane, and is summed across
// the lanes at the end, so every lane works. bt: the T columns' weights as [T][K] (zero past n).
// The sums come in another order than the other columns' (float32's rounding either way); the
// epilogue (bias, residual, clamp) is gemm_tile's, a value at a time. Rows arow[0 .. m - 1] (m at
// most R: R * T accumulators, T weight vectors and an input vector in registers).
template <int T, int R = (T == 4 ? 6 : 2)>
static inline void gemm_tail_dot(const float* const* arow, int m, const Segments& segments, const float* bt,
                                 int64_t k, int c0, int n, const float* bias, const Residual* residual, int64_t row,
                                 float lo, float hi, float* c, int cout) {
  static_assert(T == 4 || T == 8, "T columns: 4 or 8");
  __m512 acc[R][T];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < T; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t kb = 0;  // this segment's first K index in bt
  for (const int64_t offset : segments.offset) {
    for (int kk = 0; kk < segments.length; kk += 16) {
      const int left = segments.length - kk;
      const __mmask16 mask = static_cast<__mmask16>(left >= 16 ? 0xffffu : (1u << left) - 1u);
      __m512 w[T];
#pragma GCC unroll 8
      for (int j = 0; j < T; ++j) w[j] = _mm512_maskz_loadu_ps(mask, bt + j * k + kb + kk);
#pragma GCC unroll 6
      for (int i = 0; i < R; ++i) {
        const __m512 a = _mm512_maskz_loadu_ps(mask, arow[i] + offset + kk);
#pragma GCC unroll 8
        for (int j = 0; j < T; ++j) acc[i][j] = _mm512_fmadd_ps(a, w[j], acc[i][j]);
      }
    }
    kb += segments.length;
  }
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    if (i >= m) break;
    alignas(32) float sums[8];
    _mm_store_ps(sums, lane_sums(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    if (T == 8) _mm_store_ps(sums + 4, lane_sums(acc[i][T - 4], acc[i][T - 3], acc[i][T - 2], acc[i][T - 1]));
    float* out = c + static_cast<int64_t>(i) * cout + c0;
    for (int q = 0; q < n; ++q) {
      float v = sums[q] + bias[c0 + q];
      if (residual) v = v + *residual->at(row + i, c0 + q);
      v = v < lo ? lo : v;  // _mm512_max_ps(lo, v): NaN stays
      out[q] = hi < v ? hi : v;  // _mm512_min_ps(hi, v)
    }
  }
}

// The weights of the columns gemm_tail_dot takes (the last n = cout % kFloatTileN, where 1 to 8), as
// it reads them: [T][K], T = 4 or 8, zero past n; empty where it is not used.
static std::vector<float> tail_weights(const float* b, int64_t ldb, int64_t k, int cout) {
  const int n = cout % kFloatTileN, c0 = cout - n;
  if (n < 1 || n > 8) return {};
  const int t = n <= 4 ? 4 : 8;
  std::vector<float> bt(static_cast<size_t>(t) * k, 0.0f);
  for (int j = 0; j < n; ++j)
    for (int64_t kk = 0; kk < k; ++kk) bt[j * k + kk] = b[kk * ldb + c0 + j];
  return bt;
}
#endif

#if HAVE_BF16
// bfloat16 products with float32 sums (AVX512_BF16's VDPBF16PS: two products a lane an instruction,
// twice the FMA's where it issues as fast: 1.2-1.7x float32 a convolution on the Zen 5 measured; the
// Intel Xeon measured issues it at a quarter of the FMA's rate, 0.5-0.7x float32: docs/benchmarks.md):
// gemm_tile with the A rows and B in bfloat16, K taken in pairs (B prepared by
// prepare_float_weights_bf16: [K / 2, Cout rounded up, 2]; ldb counts uint16 values). Compiled for
// AVX512_BF16 whatever the build's flags; run only where the CPU has it (cpu_supports).
#define BF16_TARGET __attribute__((target("avx512bf16")))
static inline BF16_TARGET __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

template <int NV>
static inline __attribute__((always_inline)) BF16_TARGET void gemm_tile_bf16(
    const uint16_t* const* arow, int m, const Segments& segments, const uint16_t* bp, int64_t ldb, int c0, int n,
    const float* bias, const Residual* residual, int64_t row, float lo, float hi, float* c, int cout) {
  GEMM_TILE_PREFETCH_RESIDUAL
#define ROW(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
  ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
  for (const int64_t offset : segments.offset) {
    const uint16_t* a_row[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) a_row[i] = arow[i] + offset;
    for (int kk = 0; kk < segments.length; kk += 2, bp += ldb) {
      const __m512i b0 = _mm512_loadu_si512(bp);
      const __m512i b1 = NV > 1 ? _mm512_loadu_si512(bp + 32) : b0;
      const __m512i b2 = NV > 2 ? _mm512_loadu_si512(bp + 64) : b0;
      const __m512i b3 = NV > 3 ? _mm512_loadu_si512(bp + 96) : b0;
#define ROW(i)                                                      \
  {                                                                 \
    int32_t pair;                                                   \
    std::memcpy(&pair, a_row[i] + kk, sizeof(pair));                \
    const __m512i a = _mm512_set1_epi32(pair);                      \
    c##i##0 = dot_bf16(c##i##0, a, b0);                             \
    if (NV > 1) c##i##1 = dot_bf16(c##i##1, a, b1);                 \
    if (NV > 2) c##i##2 = dot_bf16(c##i##2, a, b2);                 \
    if (NV > 3) c##i##3 = dot_bf16(c##i##3, a, b3);                 \
  }
      ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
  }
  GEMM_TILE_EPILOGUE
}
#endif

// out[r, c] = clamp(sum_k a[r, k] b[k, c] + bias[c] (+ residual[row0 + r, c]), lo, hi), row r of A
// being the segments of base[r]; tail: tail_weights(b, ...) (AVX-512), the last columns by
// gemm_tail_dot where it is not empty
static void gemm_rows(const float* const* base, int64_t rows, const Segments& segments, const float* b, int64_t ldb,
                      int cout, const float* bias, const Residual* residual, int64_t row0, float lo, float hi,
                      float* c, const std::vector<float>& tail) {
  const int nblocks = static_cast<int>(ldb / kFloatTileN);
  for (int64_t r0 = 0; r0 < rows; r0 += kFloatTileM) {
    const int m = static_cast<int>(std::min<int64_t>(kFloatTileM, rows - r0));
    const float* arow[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) arow[i] = base[r0 + std::min(i, m - 1)];
    for (int nb = 0; nb < nblocks; ++nb) {
      const float* bp = b + nb * kFloatTileN;
      const int c0 = nb * kFloatTileN, n = std::min(kFloatTileN, cout - c0);
#if defined(__AVX512F__)
      float* out = c + r0 * cout;
      if (!tail.empty() && nb == nblocks - 1) {
        const int64_t k = static_cast<int64_t>(segments.offset.size()) * segments.length;
        static_assert(kFloatTileM == 6, "gemm_tail_dot's rows: 6 at once, or 3 times 2");
        if (n <= 4) {
          gemm_tail_dot<4>(arow, m, segments, tail.data(), k, c0, n, bias, residual, row0 + r0, lo, hi, out, cout);
        } else {
          for (int i = 0; i < m; i += 2)
            gemm_tail_dot<8>(arow + i, std::min(2, m - i), segments, tail.data(), k, c0, n, bias, residual,
                             row0 + r0 + i, lo, hi, out + static_cast<int64_t>(i) * cout, cout);
        }
        continue;
      }
      switch ((n + 15) / 16) {  // the last block of a channel count that is not a multiple of 64
        case 1: gemm_tile<1>(arow, m, segments, bp, ldb, c0, n, bias, residual, row0 + r0, lo, hi, out, cout); break;
        case 2: gemm_tile<2>(arow, m, segments, bp, ldb, c0, n, bias, residual, row0 + r0, lo, hi, out, cout); break;
        case 3: gemm_tile<3>(arow, m, segments, bp, ldb, c0, n, bias, residual, row0 + r0, lo, hi, out, cout); break;
        default: gemm_tile<4>(arow, m, segments, bp, ldb, c0, n, bias, residual, row0 + r0, lo, hi, out, cout);
      }
#else
      alignas(64) float tmp[kFloatTileM][kFloatTileN];
      vfloat acc[kFloatTileM][kFloatVectors] = {};
      for (const int64_t offset : segments.offset)
        for (int kk = 0; kk < segments.length; ++kk, bp += ldb) {
          vfloat bv[kFloatVectors];
          for (int j = 0; j < kFloatVectors; ++j) bv[j] = load_v(bp + j * kFloatLanes);
          for (int i = 0; i < kFloatTileM; ++i) {
            const float av = arow[i][offset + kk];  // broadcast by the vector-scalar product
            for (int j = 0; j < kFloatVectors; ++j) acc[i][j] += av * bv[j];
          }
        }
      if (n == kFloatTileN) {  // whole columns: the epilogue in vectors, each lane as the loop below
        const vfloat lo_v = vfloat{} + lo, hi_v = vfloat{} + hi;
        static_assert(kFloatTileN <= 16, "a tile's columns lie in one residual group");
        const float* residual_at = residual ? residual->at(row0 + r0, c0) : nullptr;
        const int64_t residual_width = residual ? residual->width[c0 / 16] : 0;
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < kFloatVectors; ++j) {
            const int col = c0 + j * kFloatLanes;
            vfloat v = acc[i][j] + load_v(bias + col);
            if (residual) v = v + load_v(residual_at + i * residual_width + j * kFloatLanes);
            v = v < lo_v ? lo_v : v;  // std::max(v, lo): NaN stays
            v = hi_v < v ? hi_v : v;  // std::min(v, hi)
            store_v(c + (r0 + i) * cout + col, v);
          }
        continue;
      }
      for (int i = 0; i < kFloatTileM; ++i)
        for (int j = 0; j < kFloatVectors; ++j) store_v(tmp[i] + j * kFloatLanes, acc[i][j]);
      for (int i = 0; i < m; ++i) {
        float* out = c + (r0 + i) * cout + c0;
        for (int q = 0; q < n; ++q) {
          float v = tmp[i][q] + bias[c0 + q];
          if (residual) v = v + *residual->at(row0 + r0 + i, c0 + q);
          out[q] = std::min(std::max(v, lo), hi);
        }
      }
#endif
    }
  }
}

#if HAVE_BF16
// gemm_rows in bfloat16 (gemm_tile_bf16): A rows and B in bfloat16, K in pairs.
static BF16_TARGET void gemm_rows_bf16(const uint16_t* const* base, int64_t rows, const Segments& segments,
                                       const uint16_t* b, int64_t ldb, int cout, const float* bias,
                                       const Residual* residual, int64_t row0, float lo, float hi, float* c) {
  const int nblocks = static_cast<int>(ldb / (2 * kFloatTileN));
  for (int64_t r0 = 0; r0 < rows; r0 += kFloatTileM) {
    const int m = static_cast<int>(std::min<int64_t>(kFloatTileM, rows - r0));
    const uint16_t* arow[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) arow[i] = base[r0 + std::min(i, m - 1)];
    for (int nb = 0; nb < nblocks; ++nb) {
      const uint16_t* bp = b + 2 * nb * kFloatTileN;
      const int c0 = nb * kFloatTileN, n = std::min(kFloatTileN, cout - c0);
      float* out = c + r0 * cout;
      switch ((n + 15) / 16) {
        case 1: gemm_tile_bf16<1>(arow, m, segments, bp, ldb, c0, n, bias, residual, row0 + r0, lo, hi, out, cout); break;
        case 2: gemm_tile_bf16<2>(arow, m, segments, bp, ldb, c0, n, bias, residual, row0 + r0, lo, hi, out, cout); break;
        case 3: gemm_tile_bf16<3>(arow, m, segments, bp, ldb, c0, n, bias, residual, row0 + r0, lo, hi, out, cout); break;
        default: gemm_tile_bf16<4>(arow, m, segments, bp, ldb, c0, n, bias, residual, row0 + r0, lo, hi, out, cout);
      }
    }
  }
}
#endif

// float32 -> bfloat16, rounded to nearest even (NaN stays NaN), as VCVTNEPS2BF16 rounds.
static inline uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#if HAVE_BF16
// float32 -> bfloat16 of n values (VCVTNEPS2BF16: rounded as to_bf16 rounds, but subnormals to zero,
// which VDPBF16PS takes them as anyway).
static BF16_TARGET void convert_bf16(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

// Filter [Cout, fh, fw, Cin] (TFLite) -> bfloat16 [weight_rows(fh * fw * Cin2 / 2), Cout rounded up,
// 2] for gemm_tile_bf16, Cin2 being Cin rounded up to even: element [p, c, e] is the weight of K
// index 2 p + e, with a zero weight for each tap's added channel and the rows past K. The
// convolution's bfloat16 copy of its input has that channel too, a zero (a zero weight on a
// neighbour's value instead would turn a NaN or infinity there into a NaN here).
static Array<uint16_t> prepare_float_weights_bf16(Array<float> filter) {
  if (filter.ndim() != 4) throw std::invalid_argument("prepare_float_weights_bf16: expected a 4-d filter");
  const int cout = static_cast<int>(filter.shape(0)), taps = static_cast<int>(filter.shape(1) * filter.shape(2));
  const int cin = static_cast<int>(filter.shape(3)), cin2 = cin + cin % 2, pairs = taps * cin2 / 2;
  const int padded = (cout + kFloatTileN - 1) / kFloatTileN * kFloatTileN;
  Array<uint16_t> out = aligned_array<uint16_t>({weight_rows(pairs), padded, 2});
  uint16_t* o = data(out);
  std::memset(o, 0, sizeof(uint16_t) * static_cast<size_t>(out.size()));
  const float* f = filter.data();
  for (int c = 0; c < cout; ++c)
    for (int t = 0; t < taps; ++t)
      for (int i = 0; i < cin; ++i) {
        const int k = t * cin2 + i;
        o[(static_cast<int64_t>(k / 2) * padded + c) * 2 + k % 2] = to_bf16(f[(static_cast<int64_t>(c) * taps + t) * cin + i]);
      }
  return out;
}
#endif

#if HAVE_INT8
// int8 products with int32 sums: the input quantised as it is copied, its own scale and zero point a
// row (q = clamp(rint(x / s) + z, 0, 255), so that x ~ s (q - z), a zero exactly z), the weights a
// scale an output channel (w ~ t w8, w8 in [-127, 127]); then out = float(acc - z colsum) * (s t) +
// bias, colsum being the channel's sum of w8, the product rounded before the bias is added (no FMA).
// The sums acc in one of two forms, the same integers (no product or pair of products overflows):
// - VNNI's (HAVE_VNNI): VPDPBUSD, AVX512_VNNI's or AVX-VNNI's, four products of an unsigned and a
//   signed byte a lane an instruction (four times the FMA's rate); the A rows in bytes, B prepared by
//   prepare_float_weights_int8 as [K / 4, Cout rounded up, 4] int8;
// - pairs (HAVE_INT8_PAIRS: AVX2 builds): VPMADDWD and an add, two products of 16-bit values a lane
//   (about 1.4x the 256-bit FMA's rate on Zen 5); the A rows widened to 16 bits as they are
//   quantised, B as [K / 2, Cout rounded up, 2] int16.
// ldb counts B's elements. A tile's sums are q00 .. (row i, vector j: q##i##j).
#if HAVE_VNNI
#if defined(__AVX512F__)
#define VNNI_TARGET __attribute__((target("avx512vnni")))
#else
#define VNNI_TARGET __attribute__((target("avxvnni")))
#endif
#endif

#if defined(__AVX512F__)
// An int8 tile's sums q as its float outputs before the bias: float(q - z colsum) * (s t), the
// product rounded (no FMA with the bias). gemm_tile_int8 and gemm_rows_amx both finish with it, so
// that their outputs agree bit for bit.
static inline __attribute__((always_inline)) __m512 int8_sums_scaled(__m512i q, __m512i z, __m512i colsum, __m512 s,
                                                                     __m512 t) {
  return rounded_product(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_mullo_epi32(z, colsum))), _mm512_mul_ps(s, t));
}

template <int NV>
static inline VNNI_TARGET void gemm_tile_int8(
    const uint8_t* const* arow, int m, const Segments& segments, const int8_t* bp, int64_t ldb, int c0, int n,
    const float* weight_scale, const int32_t* weight_sum, const float* row_scale, const int32_t* row_zero,
    const float* bias, const Residual* residual, int64_t row, float lo, float hi, float* c, int cout) {
  GEMM_TILE_PREFETCH_RESIDUAL
#define ROW(i) __m512i q##i##0 = _mm512_setzero_si512(), q##i##1 = q##i##0, q##i##2 = q##i##0, q##i##3 = q##i##0;
  ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
  for (const int64_t offset : segments.offset) {
    const uint8_t* a_row[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) a_row[i] = arow[i] + offset;
    for (int kk = 0; kk < segments.length; kk += 4, bp += ldb) {
      const __m512i b0 = _mm512_loadu_si512(bp);
      const __m512i b1 = NV > 1 ? _mm512_loadu_si512(bp + 64) : b0;
      const __m512i b2 = NV > 2 ? _mm512_loadu_si512(bp + 128) : b0;
      const __m512i b3 = NV > 3 ? _mm512_loadu_si512(bp + 192) : b0;
#define ROW(i)                                                          \
  {                                                                     \
    int32_t quad;                                                       \
    std::memcpy(&quad, a_row[i] + kk, sizeof(quad));                    \
    const __m512i a = _mm512_set1_epi32(quad);                          \
    q##i##0 = _mm512_dpbusd_epi32(q##i##0, a, b0);                      \
    if (NV > 1) q##i##1 = _mm512_dpbusd_epi32(q##i##1, a, b1);          \
    if (NV > 2) q##i##2 = _mm512_dpbusd_epi32(q##i##2, a, b2);          \
    if (NV > 3) q##i##3 = _mm512_dpbusd_epi32(q##i##3, a, b3);          \
  }
      ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
  }
  // weight_scale and weight_sum are as long as B is wide: no masks
  __m512 t_v[4];
  __m512i sum_v[4];
  for (int j = 0; j < 4; ++j) {
    t_v[j] = _mm512_loadu_ps(weight_scale + c0 + 16 * (j < NV ? j : 0));
    sum_v[j] = _mm512_loadu_si512(weight_sum + c0 + 16 * (j < NV ? j : 0));
  }
#define ROW(i)                                                                \
  const int at##i = i < m ? i : m - 1;                                        \
  const __m512i z##i = _mm512_set1_epi32(row_zero[at##i]);                    \
  const __m512 s##i = _mm512_set1_ps(row_scale[at##i]);                       \
  const __m512 c##i##0 = int8_sums_scaled(q##i##0, z##i, sum_v[0], s##i, t_v[0]); \
  const __m512 c##i##1 = int8_sums_scaled(q##i##1, z##i, sum_v[1], s##i, t_v[1]); \
  const __m512 c##i##2 = int8_sums_scaled(q##i##2, z##i, sum_v[2], s##i, t_v[2]); \
  const __m512 c##i##3 = int8_sums_scaled(q##i##3, z##i, sum_v[3], s##i, t_v[3]);
  ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
  GEMM_TILE_EPILOGUE
}
#else  // AVX2: 6 x (8 NV) tiles (NV = 2, or 1 for the last columns); the epilogue in vectors on whole
       // tiles, per value on the last columns
#define INT8_FINISH_ROW(i)                                                        \
  if (i < m) {                                                                    \
    finish(i, 0, scaled(i, q##i##0, sum0, t0));                                   \
    finish(i, 1, scaled(i, q##i##1, sum1, t1));                                   \
  }
#define INT8_STORE_ROW(i)                                                         \
  _mm256_store_ps(values[i], scaled(i, q##i##0, sum0, t0));                       \
  if (NV > 1) _mm256_store_ps(values[i] + 8, scaled(i, q##i##1, sum1, t1));
#define INT8_TILE_EPILOGUE                                                                                   \
  alignas(32) float values[kFloatTileM][kFloatTileN];                                                        \
  const __m256 t0 = _mm256_loadu_ps(weight_scale + c0), t1 = _mm256_loadu_ps(weight_scale + c0 + 8);         \
  const __m256i sum0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight_sum + c0));                \
  const __m256i sum1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight_sum + c0 + 8));            \
  auto scaled = [&](int i, __m256i q, __m256i sum, __m256 t) {                                               \
    const int at = i < m ? i : m - 1;                                                                        \
    const __m256i z = _mm256_set1_epi32(row_zero[at]);                                                       \
    return rounded_product(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_mullo_epi32(z, sum))),              \
                           _mm256_mul_ps(_mm256_set1_ps(row_scale[at]), t));                                 \
  };                                                                                                         \
  if (n == kFloatTileN) { /* whole columns: bias, residual and clamp in vectors (NaN passes, as in TFLite) */ \
    const __m256 bias0 = _mm256_loadu_ps(bias + c0), bias1 = _mm256_loadu_ps(bias + c0 + 8);                 \
    const __m256 lo_v = _mm256_set1_ps(lo), hi_v = _mm256_set1_ps(hi);                                       \
    /* the tile's 16 columns: one residual group */                                                          \
    const float* residual_at = residual ? residual->at(row, c0) : nullptr;                                   \
    const int64_t residual_width = residual ? residual->width[c0 / 16] : 0;                                  \
    auto finish = [&](int i, int j, __m256 v) {                                                              \
      v = _mm256_add_ps(v, j ? bias1 : bias0);                                                               \
      if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual_at + i * residual_width + 8 * j));         \
      _mm256_storeu_ps(c + static_cast<int64_t>(i) * cout + c0 + 8 * j, _mm256_min_ps(hi_v, _mm256_max_ps(lo_v, v))); \
    };                                                                                                       \
    INT8_FINISH_ROW(0) INT8_FINISH_ROW(1) INT8_FINISH_ROW(2) INT8_FINISH_ROW(3) INT8_FINISH_ROW(4)           \
    INT8_FINISH_ROW(5)                                                                                       \
    return;                                                                                                  \
  }                                                                                                          \
  INT8_STORE_ROW(0) INT8_STORE_ROW(1) INT8_STORE_ROW(2) INT8_STORE_ROW(3) INT8_STORE_ROW(4) INT8_STORE_ROW(5)  \
  for (int i = 0; i < m; ++i)                                                                                \
    for (int q = 0; q < n; ++q) {                                                                            \
      float v = values[i][q] + bias[c0 + q];                                                                 \
      if (residual) v = v + *residual->at(row + i, c0 + q);                                                  \
      c[static_cast<int64_t>(i) * cout + c0 + q] = std::min(std::max(v, lo), hi);                            \
    }

#define INT8_TILE_START                                                                                      \
  static_assert(kFloatTileM == 6 && kFloatTileN == 16, "the AVX2 int8 tile is 6 x 16");                      \
  __m256i q00 = _mm256_setzero_si256(), q01 = q00, q10 = q00, q11 = q00, q20 = q00, q21 = q00, q30 = q00,    \
          q31 = q00, q40 = q00, q41 = q00, q50 = q00, q51 = q00;

#if HAVE_VNNI
template <int NV>
static inline VNNI_TARGET void gemm_tile_int8(
    const uint8_t* const* arow, int m, const Segments& segments, const int8_t* bp, int64_t ldb, int c0, int n,
    const float* weight_scale, const int32_t* weight_sum, const float* row_scale, const int32_t* row_zero,
    const float* bias, const Residual* residual, int64_t row, float lo, float hi, float* c, int cout) {
  INT8_TILE_START
  for (const int64_t offset : segments.offset) {
    const uint8_t* a_row[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) a_row[i] = arow[i] + offset;
    for (int kk = 0; kk < segments.length; kk += 4, bp += ldb) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
      const __m256i b1 = NV > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 32)) : b0;
#define ROW(i)                                                          \
  {                                                                     \
    int32_t quad;                                                       \
    std::memcpy(&quad, a_row[i] + kk, sizeof(quad));                    \
    const __m256i a = _mm256_set1_epi32(quad);                          \
    q##i##0 = _mm256_dpbusd_avx_epi32(q##i##0, a, b0);                  \
    if (NV > 1) q##i##1 = _mm256_dpbusd_avx_epi32(q##i##1, a, b1);      \
  }
      ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
  }
  INT8_TILE_EPILOGUE
}
#endif

template <int NV>
static inline void gemm_tile_int8(
    const uint16_t* const* arow, int m, const Segments& segments, const int16_t* bp, int64_t ldb, int c0, int n,
    const float* weight_scale, const int32_t* weight_sum, const float* row_scale, const int32_t* row_zero,
    const float* bias, const Residual* residual, int64_t row, float lo, float hi, float* c, int cout) {
  INT8_TILE_START
  for (const int64_t offset : segments.offset) {
    const uint16_t* a_row[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) a_row[i] = arow[i] + offset;
    for (int kk = 0; kk < segments.length; kk += 2, bp += ldb) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
      const __m256i b1 = NV > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 16)) : b0;
#define ROW(i)                                                                    \
  {                                                                               \
    int32_t pair;                                                                 \
    std::memcpy(&pair, a_row[i] + kk, sizeof(pair));                              \
    const __m256i a = _mm256_set1_epi32(pair);                                    \
    q##i##0 = _mm256_add_epi32(q##i##0, _mm256_madd_epi16(a, b0));                \
    if (NV > 1) q##i##1 = _mm256_add_epi32(q##i##1, _mm256_madd_epi16(a, b1));    \
  }
      ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
  }
  INT8_TILE_EPILOGUE
}
#endif

// gemm_rows in int8 (gemm_tile_int8, either form): row r's scale and zero point at row_scale[r],
// row_zero[r]. Inlined whole (tiles included) into gemm_rows_int8 below, one function a form, so
// that only VNNI's form is compiled for VNNI (a compiler may fuse the pairs' multiply and add
// into VNNI's VPDPWSSD, which the CPUs the pairs form is for do not have).
template <typename A, typename W>
static inline void gemm_rows_int8_body(const A* const* base, int64_t rows, const Segments& segments, const W* b,
                                       int64_t ldb, int cout, const float* weight_scale, const int32_t* weight_sum,
                                       const float* row_scale, const int32_t* row_zero, const float* bias,
                                       const Residual* residual, int64_t row0, float lo, float hi, float* c) {
  constexpr int pack = 4 / sizeof(W);  // K values to a B element group
  const int nblocks = static_cast<int>(ldb / (pack * kFloatTileN));
  for (int64_t r0 = 0; r0 < rows; r0 += kFloatTileM) {
    const int m = static_cast<int>(std::min<int64_t>(kFloatTileM, rows - r0));
    const A* arow[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) arow[i] = base[r0 + std::min(i, m - 1)];
    const float* s = row_scale + r0;
    const int32_t* z = row_zero + r0;
    for (int nb = 0; nb < nblocks; ++nb) {
      const W* bp = b + pack * nb * kFloatTileN;
      const int c0 = nb * kFloatTileN, n = std::min(kFloatTileN, cout - c0);
      float* out = c + r0 * cout;
#define TILE(NV) gemm_tile_int8<NV>(arow, m, segments, bp, ldb, c0, n, weight_scale, weight_sum, s, z, bias, residual, \
                                    row0 + r0, lo, hi, out, cout)
      switch ((n + kFloatLanes - 1) / kFloatLanes) {  // the last block of a channel count not a multiple of the tile's
        case 1: TILE(1); break;
#if defined(__AVX512F__)
        case 2: TILE(2); break;
        case 3: TILE(3); break;
        default: TILE(4);
#else
        default: TILE(2);
#endif
      }
#undef TILE
    }
  }
}

#if HAVE_VNNI
static VNNI_TARGET __attribute__((flatten)) void gemm_rows_int8(
    const uint8_t* const* base, int64_t rows, const Segments& segments, const int8_t* b, int64_t ldb, int cout,
    const float* weight_scale, const int32_t* weight_sum, const float* row_scale, const int32_t* row_zero,
    const float* bias, const Residual* residual, int64_t row0, float lo, float hi, float* c) {
  gemm_rows_int8_body(base, rows, segments, b, ldb, cout, weight_scale, weight_sum, row_scale, row_zero, bias,
                      residual, row0, lo, hi, c);
}
#endif
#if HAVE_INT8_PAIRS
static __attribute__((flatten)) void gemm_rows_int8(
    const uint16_t* const* base, int64_t rows, const Segments& segments, const int16_t* b, int64_t ldb, int cout,
    const float* weight_scale, const int32_t* weight_sum, const float* row_scale, const int32_t* row_zero,
    const float* bias, const Residual* residual, int64_t row0, float lo, float hi, float* c) {
  gemm_rows_int8_body(base, rows, segments, b, ldb, cout, weight_scale, weight_sum, row_scale, row_zero, bias,
                      residual, row0, lo, hi, c);
}
#endif

#if HAVE_AMX
// ---------------------------------------------------------------------------------------------
// AMX: the int8 and bfloat16 convolutions' products on the tile unit, TDPBUSD (int8, 16 x 16 x 64
// products an instruction: 2450 G a second on a core of the Xeon measured, against VPDPBUSD's 366 G)
// and TDPBF16PS (bfloat16, 16 x 16 x 32). B is VNNI's and VDPBF16PS's as prepared
// ([weight_rows(K / 4), Cout rounded up, 4] int8, [weight_rows(K / 2), Cout rounded up, 2]
// bfloat16): both are a tile's rows as it wants them, 64 bytes (16 columns) of a row of K groups. A block is 16 or 32 GEMM rows
// (tiles 4 and 5) by 32 columns (tiles 6 and 7) into four accumulator tiles (0-3), stored and then
// finished as the vector kernels finish theirs: in int8 the sums are the same integers and the
// epilogue the same instructions, so the outputs are VNNI's bit for bit; in bfloat16 the products'
// sums are float32 in another order (within float32's rounding of the vector kernels').
// A block's rows are read in place where they lie equally strided in memory and a filter row's
// values are whole 64-byte runs (a 1x1 stride-1 convolution's rows with Cin a multiple of 64 in
// int8, of 32 in bfloat16; a 3x3's along an output row; a shorter run, down to one row, has the
// tiles loaded with fewer rows). Any other convolution's (the 7x7 stem's 3 channels) are gathered
// into a buffer first in bfloat16; in int8 such a convolution takes VNNI's kernels (the copies cost
// as much as VNNI's products).
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,amx-bf16")))

// Whether this CPU has AMX's tiles with int8 (bf16 false) or bfloat16 products and Linux lets this
// process use them (asked once: a process gets the tiles' state only when it asks for it).
static bool amx_supported(bool bf16) {
  static const int features = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24))) return 0;  // AMX-TILE
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    if (syscall(SYS_arch_prctl, kRequestPermission, kTileData) != 0) return 0;
    return static_cast<int>(((d >> 25) & 1u) | (((d >> 22) & 1u) << 1));  // AMX-INT8, AMX-BF16
  }();
  return (features & (bf16 ? 2 : 1)) != 0;
}

// amx_supported, unless the environment variable LARQ_LANDMARKS_NO_AMX is 1 (read at each call).
static bool amx_enabled(bool bf16) {
  const char* off = std::getenv("LARQ_LANDMARKS_NO_AMX");
  return amx_supported(bf16) && !(off && std::strcmp(off, "1") == 0);
}

// The tiles' shapes for amx_block (palette 1, every row 64 bytes): tile_config(t) gives the A tile 4
// and the accumulators 0 and 1 t rows (a block of t <= 16 rows), the others 16.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};
static constexpr TileConfig tile_config(int t) {
  TileConfig config{};
  config.palette = 1;
  for (int tile = 0; tile < 8; ++tile) {
    config.bytes_per_row[tile] = 64;
    config.rows[tile] = static_cast<uint8_t>(tile == 0 || tile == 1 || tile == 4 ? t : 16);
  }
  return config;
}
// static objects, loaded by address: GCC 12's _tile_loadconfig tells the compiler that it reads 8
// bytes, so that the stores that fill a local one could be dropped
static const TileConfig kTileConfigs[17] = {
    tile_config(16), tile_config(1), tile_config(2),  tile_config(3),  tile_config(4),  tile_config(5),
    tile_config(6),  tile_config(7), tile_config(8),  tile_config(9),  tile_config(10), tile_config(11),
    tile_config(12), tile_config(13), tile_config(14), tile_config(15), tile_config(16)};

// Loads kTileConfigs[t] in this thread; amx_release gives the tiles' state back.
static AMX_TARGET void amx_configure(int t) { _tile_loadconfig(&kTileConfigs[t]); }
static AMX_TARGET void amx_release() { _tile_release(); }

// One block: the 16 MT rows (MT 1 or 2) at a, a + stride, ... (bytes) by the 32 columns of B at bp
// (ldb bytes a B row), K over the segments (offsets and a length in bytes), into acc: 32 x 32 int32
// sums (bf16 false) or float32 sums, row i at acc + 32 i.
template <bool BF16, int MT>
static AMX_TARGET void amx_block(const uint8_t* a, int64_t stride, const Segments& segments, int64_t offset_scale,
                                 int64_t length, const uint8_t* bp, int64_t ldb, void* acc) {
  _tile_zero(0);
  _tile_zero(1);
  if (MT > 1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (const int64_t offset : segments.offset) {
    const uint8_t* at = a + offset * offset_scale;
    for (int64_t kk = 0; kk < length; kk += 64, bp += 16 * ldb) {
      _tile_loadd(6, bp, ldb);
      _tile_loadd(7, bp + 64, ldb);
      _tile_loadd(4, at + kk, stride);
      if (MT > 1) _tile_loadd(5, at + kk + 16 * stride, stride);
      if constexpr (BF16) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (MT > 1) {
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      } else {
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        if (MT > 1) {
          _tile_dpbusd(2, 5, 6);
          _tile_dpbusd(3, 5, 7);
        }
      }
    }
  }
  char* out = static_cast<char*>(acc);
  _tile_stored(0, out, 128);
  _tile_stored(1, out + 64, 128);
  if (MT > 1) {
    _tile_stored(2, out + 16 * 128, 128);
    _tile_stored(3, out + 16 * 128 + 64, 128);
  }
}

// n bytes from src to dst in 64-byte vectors, the last one masked (a gathered row's runs, as the
// 7x7 stem's 56 bytes in bfloat16)
static inline void copy_bytes(const uint8_t* src, int64_t n, uint8_t* dst) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) _mm512_storeu_si512(dst + i, _mm512_loadu_si512(src + i));
  if (i < n) {
    const __mmask64 mask = (1ull << (n - i)) - 1;
    _mm512_mask_storeu_epi8(dst + i, mask, _mm512_maskz_loadu_epi8(mask, src + i));
  }
}

// gemm_rows_int8 (VNNI's form; weight_scale .. row_zero as there) or gemm_rows_bf16 (A and B
// bfloat16, B from prepare_float_weights_bf16; weight_scale .. row_zero unused) in AMX's blocks
// (amx_block), every row: read in place where a filter row's values are whole 64-byte runs (the
// rows of a block equally strided), else gathered in bfloat16 (each row's segments copied into one
// run, K rounded up to 64 bytes with zeros, which meet B's zero rows: weight_rows) and left to
// VNNI's kernels in int8.
template <typename A, typename W>
static void gemm_rows_amx(const A* const* base, int64_t rows, const Segments& segments, const W* b, int64_t ldb,
                          int cout, const float* weight_scale, const int32_t* weight_sum, const float* row_scale,
                          const int32_t* row_zero, const float* bias, const Residual* residual, int64_t row0,
                          float lo, float hi, float* c) {
  constexpr bool kBf16 = std::is_same_v<A, uint16_t>;
  static_assert(kBf16 ? std::is_same_v<W, uint16_t> : std::is_same_v<A, uint8_t> && std::is_same_v<W, int8_t>,
                "int8 (VNNI's form) or bfloat16");
  const int64_t length = segments.length * static_cast<int64_t>(sizeof(A)), b_row = ldb * static_cast<int64_t>(sizeof(W));
  const bool gather = length % 64 != 0;
  if constexpr (!kBf16) {
    // int8 gathered paid only for wide outputs (the 7x7 stem, 3 -> 16, 64, 128 channels: 0.86, 1.21,
    // 1.73 ms against VNNI's 0.47, 1.04, 1.79; the copies cost as much as VNNI's products): VNNI's
    // kernels, the same outputs
    if (gather) {
      gemm_rows_int8(base, rows, segments, b, ldb, cout, weight_scale, weight_sum, row_scale, row_zero, bias, residual,
                     row0, lo, hi, c);
      return;
    }
  }
  // gathered: every row's K bytes (`whole`), read as one segment; all rows before the first block
  // (a tile load waits for the stores before it to reach the cache: gathering each block just before
  // its loads was slower, 2.2 against 1.8 ms on the int8 7x7 stem when int8 gathered too)
  const int64_t whole = gather ? (static_cast<int64_t>(segments.offset.size()) * length + 63) / 64 * 64 : length;
  const Segments one_run{{0}, 0};
  static thread_local std::vector<uint8_t> gathered;
  if (gather) {
    gathered.assign(static_cast<size_t>(rows * whole), 0);  // the K past the segments stays zero
    for (int64_t r = 0; r < rows; ++r)
      for (size_t q = 0; q < segments.offset.size(); ++q)
        copy_bytes(reinterpret_cast<const uint8_t*>(base[r] + segments.offset[q]), length,
                   gathered.data() + r * whole + static_cast<int64_t>(q) * length);
  }
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(b);
  const __m512 lo_v = _mm512_set1_ps(lo), hi_v = _mm512_set1_ps(hi);
  alignas(64) int32_t sums[32 * 32];
  alignas(64) float values[32 * 32];
  int configured = 16;  // the rows of the tiles as loaded
  amx_configure(configured);
  for (int64_t r0 = 0, m = 0; r0 < rows; r0 += m) {
    // the block: 32 or 16 rows, or fewer where fewer are left or (read in place) the run of equally
    // strided rows from r0 is shorter (the tiles loaded with that many rows), so that every row takes
    // the tiles whatever the tasks' rows (bfloat16's sums differ from the vector kernels' in their
    // last bits)
    const uint8_t* a;
    int64_t stride;
    if (gather) {
      m = std::min<int64_t>(32, rows - r0);
      a = gathered.data() + r0 * whole;
      stride = whole;
    } else {
      a = reinterpret_cast<const uint8_t*>(base[r0]);
      stride = r0 + 1 < rows ? reinterpret_cast<const uint8_t*>(base[r0 + 1]) - a : 0;
      m = 1;
      while (m < 32 && r0 + m < rows && reinterpret_cast<const uint8_t*>(base[r0 + m]) == a + m * stride) ++m;
    }
    if (m > 16 && m < 32) m = 16;
    const int tile_rows = static_cast<int>(std::min<int64_t>(m, 16));
    if (tile_rows != configured) amx_configure(configured = tile_rows);
    for (int c0 = 0; c0 < cout; c0 += 32) {
      void* acc = kBf16 ? static_cast<void*>(values) : static_cast<void*>(sums);
      const uint8_t* bp = bytes + static_cast<int64_t>(c0) * 4;  // 4 bytes a column in a B row
      // the residual asked for before the products, as the vector kernels do (GEMM_TILE_PREFETCH_RESIDUAL)
      if (residual)
        for (int j = 0; j < 2 && c0 + 16 * j < cout; ++j)
          for (int i = 0; i < m; ++i) __builtin_prefetch(residual->at(row0 + r0 + i, c0 + 16 * j));
      const Segments& runs = gather ? one_run : segments;
      if (m == 32)
        amx_block<kBf16, 2>(a, stride, runs, sizeof(A), whole, bp, b_row, acc);
      else
        amx_block<kBf16, 1>(a, stride, runs, sizeof(A), whole, bp, b_row, acc);
      // the epilogue: int8_sums_scaled as gemm_tile_int8's, then GEMM_TILE_EPILOGUE's instructions
      for (int j = 0; j < 2 && c0 + 16 * j < cout; ++j) {
        const int col = c0 + 16 * j, left = std::min(16, cout - col);
        const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
        const __m512 bias_v = _mm512_maskz_loadu_ps(mask, bias + col);
        __m512 t_v = _mm512_setzero_ps();  // int8: the weights' scales and sums (as long as B is wide: no masks)
        __m512i sum_v = _mm512_setzero_si512();
        if constexpr (!kBf16) {
          t_v = _mm512_loadu_ps(weight_scale + col);
          sum_v = _mm512_loadu_si512(weight_sum + col);
        }
        for (int i = 0; i < m; ++i) {
          __m512 v;
          if constexpr (kBf16)
            v = _mm512_load_ps(values + 32 * i + 16 * j);
          else
            v = int8_sums_scaled(_mm512_load_si512(sums + 32 * i + 16 * j), _mm512_set1_epi32(row_zero[r0 + i]), sum_v,
                                 _mm512_set1_ps(row_scale[r0 + i]), t_v);
          v = _mm512_add_ps(v, bias_v);
          if (residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, residual->at(row0 + r0 + i, col)));
          // max / min return their second operand when either is NaN: NaN passes through, as in TFLite
          _mm512_mask_storeu_ps(c + (r0 + i) * cout + col, mask, _mm512_min_ps(hi_v, _mm512_max_ps(lo_v, v)));
        }
      }
    }
  }
  amx_release();
}
#endif

// The quantisation of a run of values: lo = min(0, min x), hi = max(0, max x) and whether every x
// is finite, accumulated over calls.
struct Range {
  float lo = 0.0f, hi = 0.0f;
  bool finite = true;
  void add(const float* x, int64_t n) {
    int64_t i = 0;
    float bad = 0.0f;  // NaN where some x is NaN or infinite
#if defined(__AVX512F__)
    __m512 low = _mm512_set1_ps(lo), high = _mm512_set1_ps(hi), nan = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      low = _mm512_min_ps(low, v);
      high = _mm512_max_ps(high, v);
      nan = _mm512_add_ps(nan, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    lo = _mm512_reduce_min_ps(low);
    hi = _mm512_reduce_max_ps(high);
    bad = _mm512_reduce_add_ps(nan);
#else
    __m256 low = _mm256_set1_ps(lo), high = _mm256_set1_ps(hi), nan = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      low = _mm256_min_ps(low, v);
      high = _mm256_max_ps(high, v);
      nan = _mm256_add_ps(nan, _mm256_mul_ps(v, _mm256_setzero_ps()));
    }
    alignas(32) float lanes[3][8];
    _mm256_store_ps(lanes[0], low);
    _mm256_store_ps(lanes[1], high);
    _mm256_store_ps(lanes[2], nan);
    for (int j = 0; j < 8; ++j) {
      lo = std::min(lo, lanes[0][j]);
      hi = std::max(hi, lanes[1][j]);
      bad += lanes[2][j];
    }
#endif
    for (; i < n; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
      bad += x[i] * 0.0f;
    }
    finite = finite && bad == 0.0f;
  }
};

// A range's scale s = (hi - lo) / 255 and zero point z = rint(-lo / s) (as -lo * (255 / (hi - lo))):
// s is NaN where some value was not finite (every output that reads them is NaN, as in float32),
// 0 with z = 0 where every value was 0.
struct Quantizer {
  float scale, inverse;
  int32_t zero;
  explicit Quantizer(const Range& r) {
    const float range = r.hi - r.lo;
    scale = r.finite ? range / 255.0f : std::numeric_limits<float>::quiet_NaN();
    inverse = r.finite && range > 0.0f ? 255.0f / range : 0.0f;
    zero = static_cast<int32_t>(std::min(255.0f, std::max(0.0f, std::nearbyint(-r.lo * inverse))));
  }
  // dst[i] = clamp(rint(x[i] * inverse) + zero, 0, 255), ties to even: bytes (uint8_t) for VNNI's
  // form, the same values in 16 bits (uint16_t) for the pairs form
  template <typename T>
  void apply(const float* x, int64_t n, T* dst) const {
    static_assert(std::is_same_v<T, uint8_t> || std::is_same_v<T, uint16_t>, "bytes or 16-bit values");
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 inv = _mm512_set1_ps(inverse);
    const __m512i z = _mm512_set1_epi32(zero), low = _mm512_setzero_si512(), high = _mm512_set1_epi32(255);
    for (; i + 16 <= n; i += 16) {
      __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv)), z);
      q = _mm512_min_epi32(high, _mm512_max_epi32(low, q));
      static_assert(sizeof(T) == 1, "the pairs form is the AVX2 kernels' only");
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtepi32_epi8(q));
    }
#else
    const __m256 inv = _mm256_set1_ps(inverse);
    const __m256i z = _mm256_set1_epi32(zero), low = _mm256_setzero_si256(), high = _mm256_set1_epi32(255);
    for (; i + 8 <= n; i += 8) {
      __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv)), z);
      q = _mm256_min_epi32(high, _mm256_max_epi32(low, q));
      const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      if constexpr (sizeof(T) == 1)
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi16(words, words));
      else
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), words);
    }
#endif
    for (; i < n; ++i) {
      const float v = std::nearbyint(x[i] * inverse);  // a NaN gives 0 (its outputs are NaN by the scale)
      dst[i] = static_cast<T>(v != v ? 0 : std::min(255.0f, std::max(0.0f, v + static_cast<float>(zero))));
    }
  }
};

// Whether this CPU runs the int8 convolutions' VNNI form (this build has it and the CPU INT8_FEATURE).
static bool cpu_runs_vnni() {
#if HAVE_VNNI
  return __builtin_cpu_supports(INT8_FEATURE);
#else
  return false;
#endif
}

// Filter [Cout, fh, fw, Cin] (TFLite) -> (B, the scale of each output channel, its sum of int8
// weights). Channel c's weights are w8 = rint(w / t) with t = max |w| / 127 (1 where every weight is
// 0), K running over the taps and Cin rounded up to a multiple of 4 (an added channel's weight is 0).
// B in VNNI's form (vnni true): int8 [weight_rows(K / 4), Cout rounded up, 4], element [p, c, e] the
// weight of K index 4 p + e (the rows past K zero); in the pairs form (the AVX2 kernels'): the same
// values as int16 [K / 2, Cout rounded up, 2]. vnni unset: on the AVX2 kernels the form this CPU runs (cpu_runs_vnni), else VNNI's.
// The scales and sums are as long as B is wide (scale 1 and sum 0 past Cout).
static py::tuple prepare_float_weights_int8(Array<float> filter, std::optional<bool> vnni) {
  if (filter.ndim() != 4) throw std::invalid_argument("prepare_float_weights_int8: expected a 4-d filter");
  const bool vnni_form = vnni.value_or(!HAVE_INT8_PAIRS || cpu_runs_vnni());
  if (vnni_form && !HAVE_VNNI)
    throw std::invalid_argument("prepare_float_weights_int8: vnni=True, but these kernels were built without VNNI");
  if (!vnni_form && !HAVE_INT8_PAIRS)
    throw std::invalid_argument("prepare_float_weights_int8: vnni=False, the pairs form, is the avx2 kernels' only");
  const int cout = static_cast<int>(filter.shape(0)), taps = static_cast<int>(filter.shape(1) * filter.shape(2));
  const int cin = static_cast<int>(filter.shape(3)), cin4 = (cin + 3) / 4 * 4, pack = vnni_form ? 4 : 2;
  const int groups = taps * cin4 / pack;
  const int padded = (cout + kFloatTileN - 1) / kFloatTileN * kFloatTileN;
  const int64_t per_channel = static_cast<int64_t>(taps) * cin;
  Array<int8_t> bytes = aligned_array<int8_t>({vnni_form ? weight_rows(groups) : 0, padded, 4});
  Array<int16_t> words = aligned_array<int16_t>({vnni_form ? 0 : groups, padded, 2});
  Array<float> scales = aligned_array<float>({padded});
  Array<int32_t> sums = aligned_array<int32_t>({padded});
  int8_t* o8 = data(bytes);
  int16_t* o16 = data(words);
  float* t = data(scales);
  int32_t* sum = data(sums);
  std::memset(o8, 0, static_cast<size_t>(bytes.size()));
  std::memset(o16, 0, sizeof(int16_t) * words.size());
  const float* f = filter.data();
  for (int c = 0; c < padded; ++c) {
    t[c] = 1.0f;
    sum[c] = 0;
    if (c >= cout) continue;
    float largest = 0.0f;
    for (int64_t i = 0; i < per_channel; ++i) {
      const float w = f[c * per_channel + i];
      if (!std::isfinite(w)) throw std::invalid_argument("prepare_float_weights_int8: a weight is NaN or infinite");
      largest = std::max(largest, std::fabs(w));
    }
    if (largest > 0.0f) t[c] = largest / 127.0f;
    for (int tap = 0; tap < taps; ++tap)
      for (int i = 0; i < cin; ++i) {
        const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(f[c * per_channel + tap * cin + i] / t[c])));
        const int64_t k = tap * cin4 + i, at = (k / pack * padded + c) * pack + k % pack;
        if (vnni_form)
          o8[at] = static_cast<int8_t>(q);
        else
          o16[at] = static_cast<int16_t>(q);
        sum[c] += static_cast<int32_t>(q);
      }
  }
  return py::make_tuple(vnni_form ? py::array(bytes) : py::array(words), scales, sums);
}
#endif

// dst[i] = clamp(src[i] * m[i] + b[i], lo, hi) (m and b each optional), rounded as a MUL then an
// ADD with its fused activation (no FMA).
__attribute__((optimize("fp-contract=off")))
static void affine_copy(const float* src, int n, const float* m, const float* b, float lo, float hi, float* dst) {
  for (int i = 0; i < n; ++i) {
    float v = src[i];
    if (m) v = v * m[i];
    if (b) v = v + b[i];
    dst[i] = std::min(std::max(v, lo), hi);
  }
}

// A pool's taps read rows of the input side by side (two for a 2x2 window), which the hardware
// prefetchers follow poorly: a 2x2 max pool of a 128x128x128 input that is not in the cache took
// 0.89 ms against 0.30 for reading it through once. Each tap's load asks for the line this many
// floats (4 KB) ahead of it: 0.47 ms (64x64x256 0.35 -> 0.23; from the cache 0.13 -> 0.12 ms).
constexpr int kPoolPrefetch = 1024;

// One pooled pixel: dst[c] = clamp(v, lo, hi), v the maximum (kind 0) or the sum times `scale`
// (kind 1) of taps[t][c] over the taps in order. The maximum starts at -infinity and keeps its value
// where a tap is NaN (std::max(v, tap)); the sum adds the taps in order. Vectors of channels kept in
// registers across the taps; each lane as the scalar tail computes it. Prefetch: the taps are rows
// of an activation (pool2d), not of a thread's buffer (a convolution's fused pool, where the lines
// ahead are not the next taps' and asking for them cost that convolution 0.1 ms).
template <bool Prefetch>
static void pool_pixel(int kind, const float* const* taps, int count, int channels, float scale, float lo, float hi,
                       float* dst) {
  const float start = kind == 0 ? -std::numeric_limits<float>::infinity() : 0.0f;
  int c = 0;
  const vfloat lo_v = vfloat{} + lo, hi_v = vfloat{} + hi, scale_v = vfloat{} + scale;
  for (; c + kFloatLanes <= channels; c += kFloatLanes) {
    vfloat v = vfloat{} + start;
    for (int t = 0; t < count; ++t) {
      if (Prefetch) __builtin_prefetch(taps[t] + c + kPoolPrefetch);
      const vfloat x = load_v(taps[t] + c);
      v = kind == 0 ? (v < x ? x : v) : v + x;
    }
    if (kind != 0) v = v * scale_v;
    v = v < lo_v ? lo_v : v;  // std::max(v, lo): NaN stays
    v = hi_v < v ? hi_v : v;  // std::min(v, hi)
    store_v(dst + c, v);
  }
  for (; c < channels; ++c) {
    float v = start;
    for (int t = 0; t < count; ++t) v = kind == 0 ? std::max(v, taps[t][c]) : v + taps[t][c];
    dst[c] = std::min(std::max(kind == 0 ? v : v * scale, lo), hi);
  }
}

// count pixels of `channels` values each, from consecutive in src to `stride` values apart in dst
// (a reduced-precision copy's pixels have their channel count rounded up; the rest is left as is).
template <typename T>
static void spread_pixels(const T* src, int count, int channels, int stride, T* dst) {
  if (channels <= 4) {  // an image's 3 channels: a memcpy call a pixel took longer than its copy
    for (int i = 0; i < count; ++i)
      for (int c = 0; c < channels; ++c)
        dst[static_cast<int64_t>(i) * stride + c] = src[static_cast<int64_t>(i) * channels + c];
    return;
  }
  for (int i = 0; i < count; ++i)
    std::memcpy(dst + static_cast<int64_t>(i) * stride, src + static_cast<int64_t>(i) * channels, sizeof(T) * channels);
}

// The precisions of the float convolution's products (Engine's float_precision); int8 in its two
// forms (kInt8: VNNI's, kInt8Pairs: the pairs form).
enum class Precision { kFloat32, kBfloat16, kInt8, kInt8Pairs };
// The GEMM's A (the input as the products read it) and B (the prepared weights) in each precision.
template <Precision P>
using GemmA = std::conditional_t<P == Precision::kFloat32, float, std::conditional_t<P == Precision::kInt8, uint8_t, uint16_t>>;
template <Precision P>
using GemmB = std::conditional_t<P == Precision::kFloat32, float,
                                 std::conditional_t<P == Precision::kBfloat16, uint16_t,
                                                    std::conditional_t<P == Precision::kInt8, int8_t, int16_t>>>;

// geometry: filter_h, filter_w, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left.
// residual: the tensors whose channels, concatenated, are added to the output (none: no ADD).
// input_multiplier / input_bias (each optional, per input channel) and the clamp [input_lo,
// input_hi]: the batch norm (and activation) before the convolution, applied to the input pixels as
// they are read (the zero padding stays zero).
// kBfloat16: weights from prepare_float_weights_bf16, products in bfloat16 (the input rounded to
// bfloat16 as it is copied, odd channel counts with a zero channel added), sums in float32.
// kInt8 / kInt8Pairs: weights from prepare_float_weights_int8 (with their scales and sums) in VNNI's
// form or the pairs form, the input quantised as it is copied (channel counts rounded up to 4; in
// bytes or in 16 bits): a 1x1 stride-1 convolution's each pixel with its own scale and zero point,
// any other's each image with one (its padding the zero point).
// bfloat16: AVX-512 builds (HAVE_BF16); int8: AVX-512 builds with VNNI, AVX2 builds (HAVE_INT8).
// pool_window ({} or {ph, pw}): a MAX_POOL_2D of that window, stride and no padding (no activation)
// after the convolution (and its ADD), done by the same pass: `output` is the pooled tensor, the
// convolution's own output (ph times its height, pw times its width, the residual's shape) is
// computed one task of ph rows at a time into a buffer of the thread's and pooled from there, so it
// is never written out whole. The maxima are those MAX_POOL_2D computes (pool2d, bit for bit).
// requantize (None or RowRequantize's 6 values): an int8 file's convolution's output codes,
// computed from its float output rows as each task writes them (requantize's op 0, bit for bit),
// before they are pooled (a maximum of codes is the int8 MAX_POOL_2D's code) and `packed` packs
// them. residual_requantize (None or such 6 values, with requantize and a residual): the int8 ADD
// of the residual's codes to those codes, requantize's op 1 (the codes times scale, the
// residual's times shift), as each task writes its rows, before the pool. input_requantize (a
// list of such 6 values, for cin channels): an int8 file's MUL and ADD by constants before the
// convolution (a batch norm), each requantising the input codes in turn as requantize's op 0
// would, applied to the input pixels as they are read, after input_multiplier / input_bias where
// given.
template <Precision P>
static void conv2d_impl(Array<float> input, Array<GemmB<P>> weights,
                        Array<float> weight_scale, Array<int32_t> weight_sum, Array<float> bias,
                        std::vector<int> geometry, float lo, float hi, std::vector<Array<float>> residual,
                        Array<float> input_multiplier, Array<float> input_bias, float input_lo, float input_hi,
                        py::array output, std::vector<int> pool_window, std::vector<float> input_range,
                        py::object packed, Array<float> pack_multiplier, Array<float> pack_bias,
                        py::object requantize, py::list input_requantize, py::object residual_requantize) {
  constexpr bool kBf16 = P == Precision::kBfloat16, kInt8 = P == Precision::kInt8 || P == Precision::kInt8Pairs;
  using A = GemmA<P>;
  const char* name = kInt8 ? "conv2d_int8" : kBf16 ? "conv2d_bf16" : "conv2d";
  if (geometry.size() != 8) throw std::invalid_argument(std::string(name) + ": geometry needs 8 numbers");
  float* y = checked_data<float>(output, 4, true, "conv2d output");
  const int fh = geometry[0], fw = geometry[1], sh = geometry[2], sw = geometry[3];
  const int dh = geometry[4], dw = geometry[5], pt = geometry[6], pl = geometry[7];
  const int batch = static_cast<int>(input.shape(0)), height = static_cast<int>(input.shape(1));
  const int width = static_cast<int>(input.shape(2)), cin = static_cast<int>(input.shape(3));
  if (!pool_window.empty() && (pool_window.size() != 2 || pool_window[0] < 1 || pool_window[1] < 1))
    throw std::invalid_argument(std::string(name) + ": pool_window needs 2 positive numbers");
  const int ph = pool_window.empty() ? 1 : pool_window[0], pw = pool_window.empty() ? 1 : pool_window[1];
  const bool pooled = ph * pw > 1;
  // int8: the input's range given (lo, hi), the same for every pixel and image, else measured
  if (!input_range.empty() && (!kInt8 || input_range.size() != 2 || !(input_range[0] < input_range[1]) ||
                               !std::isfinite(input_range[0]) || !std::isfinite(input_range[1])))
    throw std::invalid_argument(std::string(name) + ": input_range needs lo < hi, both finite (int8 only)");
  // the convolution's output size (the pooled output's times the window)
  const int out_h = static_cast<int>(output.shape(1)) * ph, out_w = static_cast<int>(output.shape(2)) * pw;
  const int cout = static_cast<int>(output.shape(3));
  // a pixel's values in the GEMM's A rows
  const int channels_read = kInt8 ? (cin + 3) / 4 * 4 : kBf16 ? cin + cin % 2 : cin;
  const int pack = P == Precision::kInt8 ? 4 : kInt8 || kBf16 ? 2 : 1;  // K values to a B element group
  const int64_t k = static_cast<int64_t>(fh) * fw * channels_read;
  // B's rows: K's, rounded up to 16 (weight_rows) but in float32 and the pairs form
  const int64_t b_rows =
      P == Precision::kFloat32 || P == Precision::kInt8Pairs ? k / pack : weight_rows(static_cast<int>(k / pack));
  const bool weights_ok = pack == 1 ? weights.ndim() == 2 && weights.shape(0) == k
                                    : weights.ndim() == 3 && weights.shape(0) == b_rows && weights.shape(2) == pack;
  const bool scales_ok = !kInt8 || (weight_scale.size() == weights.shape(1) && weight_sum.size() == weights.shape(1));
  if (!weights_ok || !scales_ok || weights.shape(1) < cout || weights.shape(1) % kFloatTileN != 0 || bias.size() != cout)
    throw std::invalid_argument(std::string(name) + ": weights are not prepare_float_weights" +
                                (kInt8 ? "_int8" : kBf16 ? "_bf16" : "") + " of this filter, or bias size");
  const int64_t ldb = weights.shape(1) * pack;
  const float* x = input.data();
  const auto* b = weights.data();
  const float* bs = bias.data();
  if (output.shape(0) != batch) throw std::invalid_argument("conv2d: output batch differs from the input's");
  const int64_t pixels = static_cast<int64_t>(batch) * out_h * out_w;
  Residual parts;
  int channels = 0;
  for (auto& part : residual) {
    const int part_width = static_cast<int>(part.shape(part.ndim() - 1));
    if (part.size() != pixels * part_width || (residual.size() > 1 && part_width % 16 != 0))
      throw std::invalid_argument("conv2d: residual shape");
    for (int c = 0; c < part_width; c += 16) {
      parts.group.push_back(part.data() + c);
      parts.width.push_back(part_width);
    }
    channels += part_width;
  }
  if (!residual.empty() && channels != cout) throw std::invalid_argument("conv2d: residual channels");
  // (an int8 file's residual is added to the output's codes, after the requantising: residual_requantize)
  const Residual* res = residual.empty() || !residual_requantize.is_none() ? nullptr : &parts;
  const float* in_m = input_multiplier.size() > 0 ? input_multiplier.data() : nullptr;
  const float* in_b = input_bias.size() > 0 ? input_bias.data() : nullptr;
  if ((in_m && input_multiplier.size() != cin) || (in_b && input_bias.size() != cin))
    throw std::invalid_argument("conv2d: input multiplier or bias size");
  const bool scaled = in_m || in_b || input_lo > -std::numeric_limits<float>::infinity() ||
                      input_hi < std::numeric_limits<float>::infinity();
  std::vector<RowRequantize> in_requantize;
  for (const auto& spec : input_requantize)
    in_requantize.push_back(row_requantize(py::reinterpret_borrow<py::object>(spec), cin, name));
  const bool affine = scaled || !in_requantize.empty();
  // `count` input pixels from src to dst (cin values each) as the convolution reads them: the batch
  // norm and clamp, then each input requantising
  auto transform = [&](const float* src, int64_t count, float* dst) {
    if (scaled)
      for (int64_t i = 0; i < count; ++i) affine_copy(src + i * cin, cin, in_m, in_b, input_lo, input_hi, dst + i * cin);
    for (const RowRequantize& step : in_requantize) {
      step.apply(scaled ? dst : src, dst, count);
      src = dst;
    }
  };
  const bool direct = fh == 1 && fw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0;
  // packed: the output's bits for the LceQuantize that reads it, each task's rows as it writes them
  const RowPack pack_rows = row_pack(packed, pack_multiplier, pack_bias, output.size() / std::max(cout, 1), cout, name);
  // requantize: an int8 file's output codes, each task's rows before they are packed
  const RowRequantize requantize_output = row_requantize(requantize, cout, name);
  // residual_requantize: the int8 ADD of the residual, on the output's codes (requantize's op 1)
  const RowRequantize add_codes = row_requantize(residual_requantize, cout, name);
  if (add_codes.scale && (!requantize_output.scale || residual.empty()))
    throw std::invalid_argument(std::string(name) + ": residual_requantize needs requantize and a residual");
  // codes rows r0 .. r0 + count - 1 (at `rows`) plus the residual's: each part's channels in turn
  std::vector<std::pair<const float*, int>> code_parts;  // (data, channels) of each residual part
  for (auto& part : residual) code_parts.emplace_back(part.data(), static_cast<int>(part.shape(part.ndim() - 1)));
  auto add_residual_codes = [&](float* rows, int64_t r0, int64_t count) {
    if (!add_codes.scale) return;
    int c0 = 0;
    for (const auto& [part, w] : code_parts) {
      for (int64_t r = 0; r < count; ++r)
        requantize_rows<1, true>(rows + r * cout + c0, part + (r0 + r) * w, add_codes.scale + c0,
                                 add_codes.shift + c0, 0, 1, w, add_codes.add, add_codes.lo, add_codes.hi,
                                 add_codes.subtract, rows + r * cout + c0);
      c0 += w;
    }
  };
  py::gil_scoped_release release;
  // Any other convolution reads its taps from the input with its padding written out (zeros; the
  // batch norm applied to the input pixels only), so that every tap of every output pixel is
  // inside the buffer. In bfloat16 and int8 every input is copied so, rounded or quantised.
  const int padded_h = direct ? height : padded_extent(pt, height, out_h, sh, fh, dh);
  const int padded_w = direct ? width : padded_extent(pl, width, out_w, sw, fw, dw);
  static thread_local std::vector<A> padded;
  // int8: each GEMM row's input scale and zero point (taken by pointer in the workers' lambdas, where
  // the name of a thread_local is the worker's own)
  static thread_local std::vector<float> row_scales;
  static thread_local std::vector<int32_t> row_zeros;
  [[maybe_unused]] float* row_scale = nullptr;
  [[maybe_unused]] int32_t* row_zero = nullptr;
  const A* source = nullptr;
  // input row r (of batch * height) after the batch norm, in `row` (a buffer of width * cin)
  [[maybe_unused]] auto input_row = [&](int r, std::vector<float>& row) {
    const float* src = x + static_cast<int64_t>(r) * width * cin;
    if (!affine) return src;
    row.resize(static_cast<size_t>(width) * cin);
    transform(src, width, row.data());
    return static_cast<const float*>(row.data());
  };
  // where input row r's first pixel goes in the padded copy
  auto copy_at = [&](A* copy, int r) {
    const int bi = r / height, iy = r % height, top = direct ? 0 : pt, left = direct ? 0 : pl;
    return copy + ((static_cast<int64_t>(bi) * padded_h + iy + top) * padded_w + left) * channels_read;
  };
  const size_t values = static_cast<size_t>(batch) * padded_h * padded_w * channels_read;
  if constexpr (kBf16) {
#if HAVE_BF16
    if (direct && channels_read == cin)
      padded.resize(values);  // every value is written below
    else
      padded.assign(values, 0);  // the padding and the added channel stay zero
    uint16_t* const copy = padded.data();  // this thread's buffer (a worker's `padded` is its own)
    pool().parallel_for(batch * height, [&](int r0, int r1) {
      static thread_local std::vector<float> row;
      static thread_local std::vector<uint16_t> staged;
      for (int r = r0; r < r1; ++r) {
        const float* src = input_row(r, row);
        uint16_t* dst = copy_at(copy, r);
        if (channels_read == cin) {
          convert_bf16(src, static_cast<int64_t>(width) * cin, dst);
        } else {  // odd channel counts: the row converted in one run, then spread (the added channels stay zero)
          staged.resize(static_cast<size_t>(width) * cin);
          convert_bf16(src, static_cast<int64_t>(width) * cin, staged.data());
          spread_pixels(staged.data(), width, cin, channels_read, dst);
        }
      }
    });
    source = padded.data();
#endif
  } else if constexpr (kInt8) {
#if HAVE_INT8
    padded.resize(values);
    A* const copy = padded.data();
    row_scales.resize(pixels);
    row_zeros.resize(pixels);
    row_scale = row_scales.data();
    row_zero = row_zeros.data();
    Range given_range;  // input_range's, where given
    if (!input_range.empty()) given_range.lo = input_range[0], given_range.hi = input_range[1];
    // each pixel's values quantised with its own range, into a copy of cin rounded up to 4 a pixel
    auto quantize_pixels = [&](const float* src, int count, A* dst, int64_t pixel) {
      for (int ix = 0; ix < count; ++ix) {
        Range range = given_range;
        if (input_range.empty()) range.add(src + static_cast<int64_t>(ix) * cin, cin);
        const Quantizer q(range);
        q.apply(src + static_cast<int64_t>(ix) * cin, cin, dst + static_cast<int64_t>(ix) * channels_read);
        std::fill_n(dst + static_cast<int64_t>(ix) * channels_read + cin, channels_read - cin, static_cast<A>(q.zero));
        row_scale[pixel + ix] = q.scale;
        row_zero[pixel + ix] = q.zero;
      }
    };
    if (direct) {
      pool().parallel_for(batch * height, [&](int r0, int r1) {
        static thread_local std::vector<float> row;
        for (int r = r0; r < r1; ++r)
          quantize_pixels(input_row(r, row), width, copy_at(copy, r), static_cast<int64_t>(r) * width);
      });
    } else {  // one range an image: each row's, then the image's
      std::vector<Range> ranges(static_cast<size_t>(batch) * height, given_range);
      if (input_range.empty())
        pool().parallel_for(batch * height, [&](int r0, int r1) {
          static thread_local std::vector<float> row;
          for (int r = r0; r < r1; ++r) ranges[r].add(input_row(r, row), static_cast<int64_t>(width) * cin);
        });
      std::vector<Quantizer> images;
      for (int bi = 0; bi < batch; ++bi) {
        Range image;
        for (int iy = 0; iy < height; ++iy) {
          const Range& r = ranges[static_cast<size_t>(bi) * height + iy];
          image.lo = std::min(image.lo, r.lo);
          image.hi = std::max(image.hi, r.hi);
          image.finite = image.finite && r.finite && r.lo == r.lo && r.hi == r.hi;
        }
        images.emplace_back(image);
        const int64_t plane = static_cast<int64_t>(padded_h) * padded_w * channels_read;
        std::fill_n(copy + bi * plane, plane, static_cast<A>(images.back().zero));  // the padding: a zero
        const int64_t out_plane = static_cast<int64_t>(out_h) * out_w;
        std::fill(row_scale + bi * out_plane, row_scale + (bi + 1) * out_plane, images.back().scale);
        std::fill(row_zero + bi * out_plane, row_zero + (bi + 1) * out_plane, images.back().zero);
      }
      pool().parallel_for(batch * height, [&](int r0, int r1) {
        static thread_local std::vector<float> row;
        static thread_local std::vector<A> staged;
        for (int r = r0; r < r1; ++r) {
          const float* src = input_row(r, row);
          const Quantizer& q = images[r / height];
          A* dst = copy_at(copy, r);
          if (channels_read == cin) {
            q.apply(src, static_cast<int64_t>(width) * cin, dst);
          } else {  // the row quantised in one run, then spread (the added channels stay the zero point)
            staged.resize(static_cast<size_t>(width) * cin);
            q.apply(src, static_cast<int64_t>(width) * cin, staged.data());
            spread_pixels(staged.data(), width, cin, channels_read, dst);
          }
        }
      });
    }
    source = padded.data();
#endif
  } else {
    source = x;
    if (!direct && (affine || padded_h != height || padded_w != width)) {
      padded.assign(values, 0.0f);
      for (int r = 0; r < batch * height; ++r) {
        const float* src = x + static_cast<int64_t>(r) * width * cin;
        float* dst = copy_at(padded.data(), r);
        if (affine)
          transform(src, width, dst);
        else
          std::memcpy(dst, src, sizeof(float) * width * cin);
      }
      source = padded.data();
    }
  }
  Segments segments;
  if (direct) {
    segments = {{0}, channels_read};
  } else if (dw == 1) {
    for (int fy = 0; fy < fh; ++fy) segments.offset.push_back(static_cast<int64_t>(fy) * dh * padded_w * channels_read);
    segments.length = fw * channels_read;
  } else {
    for (int fy = 0; fy < fh; ++fy)
      for (int fx = 0; fx < fw; ++fx)
        segments.offset.push_back((static_cast<int64_t>(fy) * dh * padded_w + static_cast<int64_t>(fx) * dw) *
                                  channels_read);
    segments.length = channels_read;
  }
  // int8 (VNNI's form) and bfloat16: AMX's tiles where this CPU has them (gemm_rows_amx)
#if HAVE_AMX
  const bool amx = (P == Precision::kBfloat16 || P == Precision::kInt8) && amx_enabled(kBf16);
#endif
  // float32: the last 1-8 columns' weights for gemm_tail_dot (AVX-512)
  std::vector<float> tail;
#if defined(__AVX512F__)
  if constexpr (P == Precision::kFloat32) tail = tail_weights(b, ldb, k, cout);
#endif
  // the float32 1x1 convolution with a batch norm before it applies it a task's rows at a time
  const bool patched = P == Precision::kFloat32 && direct && affine;
  constexpr int kRowsPerTask = 96;  // a multiple of every path's row tile
  // GEMM rows (output pixels) r0 .. r0 + rows - 1 (at most kRowsPerTask) into dst; `patch`: the
  // calling thread's buffer of kRowsPerTask * cin floats (patched only)
  auto gemm_task = [&](int64_t r0, int rows, float* dst, float* patch) {
    const A* base[kRowsPerTask];
    // the first row's output position, then advanced a pixel a row (no divisions a row)
    int64_t bi = r0 / (static_cast<int64_t>(out_h) * out_w);
    int oy = static_cast<int>(r0 / out_w % out_h), ox = static_cast<int>(r0 % out_w);
    for (int r = 0; r < rows; ++r) {
      const int64_t pixel = r0 + r;
      if constexpr (P == Precision::kFloat32) {
        if (patched) {
          transform(x + pixel * cin, 1, patch + static_cast<int64_t>(r) * cin);
          base[r] = patch + static_cast<int64_t>(r) * cin;
          continue;
        }
      }
      if (direct) {
        base[r] = source + pixel * channels_read;
      } else {
        base[r] = source + ((bi * padded_h + static_cast<int64_t>(oy) * sh) * padded_w + static_cast<int64_t>(ox) * sw) *
                               channels_read;
        if (++ox == out_w) {
          ox = 0;
          if (++oy == out_h) {
            oy = 0;
            ++bi;
          }
        }
      }
    }
#if HAVE_AMX
    if constexpr (P == Precision::kBfloat16 || P == Precision::kInt8) {
      if (amx) {
        gemm_rows_amx(base, rows, segments, b, ldb, cout, weight_scale.data(), weight_sum.data(),
                      kInt8 ? row_scale + r0 : nullptr, kInt8 ? row_zero + r0 : nullptr, bs, res, r0, lo, hi, dst);
        return;
      }
    }
#endif
    if constexpr (kBf16) {
#if HAVE_BF16
      gemm_rows_bf16(base, rows, segments, b, ldb, cout, bs, res, r0, lo, hi, dst);
#endif
    } else if constexpr (kInt8) {
#if HAVE_INT8
      gemm_rows_int8(base, rows, segments, b, ldb, cout, weight_scale.data(), weight_sum.data(), row_scale + r0,
                     row_zero + r0, bs, res, r0, lo, hi, dst);
#endif
    } else {
      gemm_rows(base, rows, segments, b, ldb, cout, bs, res, r0, lo, hi, dst, tail);
    }
  };
  if (!pooled) {
    const int tasks = static_cast<int>((pixels + kRowsPerTask - 1) / kRowsPerTask);
    pool().parallel_for(tasks, [&](int t0, int t1) {
      static thread_local std::vector<float> patch;  // per thread, kept: fn runs once per chunk
      patch.resize(patched ? static_cast<size_t>(kRowsPerTask) * cin : 0);
      for (int t = t0; t < t1; ++t) {
        const int64_t r0 = static_cast<int64_t>(t) * kRowsPerTask;
        const int rows = static_cast<int>(std::min<int64_t>(kRowsPerTask, pixels - r0));
        gemm_task(r0, rows, y + r0 * cout, patch.data());
        requantize_output(y + r0 * cout, rows);
        add_residual_codes(y + r0 * cout, r0, rows);
        pack_rows(y + r0 * cout, r0, rows);
      }
    });
    return;
  }
  // a task: ph rows of the convolution's output into `strip`, pooled into one row of `output`
  const int pooled_w = out_w / pw, strip_rows = ph * out_w;
  pool().parallel_for(batch * (out_h / ph), [&](int t0, int t1) {
    static thread_local std::vector<float> patch, strip;
    static thread_local std::vector<const float*> taps;
    patch.resize(patched ? static_cast<size_t>(kRowsPerTask) * cin : 0);
    strip.resize(static_cast<size_t>(strip_rows) * cout);
    for (int t = t0; t < t1; ++t) {
      const int64_t first = static_cast<int64_t>(t) * strip_rows;
      for (int r = 0; r < strip_rows; r += kRowsPerTask) {
        const int rows = std::min(kRowsPerTask, strip_rows - r);
        float* dst = strip.data() + static_cast<int64_t>(r) * cout;
        gemm_task(first + r, rows, dst, patch.data());
        requantize_output(dst, rows);  // an int8 file's codes: maxima of codes are the pool's codes
        add_residual_codes(dst, first + r, rows);
      }
      float* dst = y + static_cast<int64_t>(t) * pooled_w * cout;
      taps.resize(static_cast<size_t>(ph) * pw);
      for (int px = 0; px < pooled_w; ++px, dst += cout) {
        for (int fy = 0; fy < ph; ++fy)  // in pool2d's order
          for (int fx = 0; fx < pw; ++fx)
            taps[fy * pw + fx] = strip.data() + (static_cast<int64_t>(fy) * out_w + px * pw + fx) * cout;
        pool_pixel<false>(0, taps.data(), ph * pw, cout, 1.0f, -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::infinity(), dst);
      }
      pack_rows(y + static_cast<int64_t>(t) * pooled_w * cout, static_cast<int64_t>(t) * pooled_w, pooled_w);
    }
  });
}

static void conv2d(Array<float> input, Array<float> weights, Array<float> bias, std::vector<int> geometry, float lo,
                   float hi, std::vector<Array<float>> residual, Array<float> input_multiplier, Array<float> input_bias,
                   float input_lo, float input_hi, py::array output, std::vector<int> pool_window,
                   py::object packed, Array<float> pack_multiplier, Array<float> pack_bias,
                   py::object requantize, py::list input_requantize, py::object residual_requantize) {
  conv2d_impl<Precision::kFloat32>(input, weights, {}, {}, bias, geometry, lo, hi, residual, input_multiplier,
                                   input_bias, input_lo, input_hi, output, pool_window, {}, packed, pack_multiplier,
                                   pack_bias, requantize, input_requantize, residual_requantize);
}

#if HAVE_BF16
static void conv2d_bf16(Array<float> input, Array<uint16_t> weights, Array<float> bias, std::vector<int> geometry,
                        float lo, float hi, std::vector<Array<float>> residual, Array<float> input_multiplier,
                        Array<float> input_bias, float input_lo, float input_hi, py::array output,
                        std::vector<int> pool_window, py::object packed, Array<float> pack_multiplier,
                        Array<float> pack_bias, py::object requantize, py::list input_requantize,
                        py::object residual_requantize) {
  if (!__builtin_cpu_supports("avx512bf16")) throw std::runtime_error("conv2d_bf16: this CPU has no AVX512_BF16");
  conv2d_impl<Precision::kBfloat16>(input, weights, {}, {}, bias, geometry, lo, hi, residual, input_multiplier,
                                    input_bias, input_lo, input_hi, output, pool_window, {}, packed, pack_multiplier,
                                    pack_bias, requantize, input_requantize, residual_requantize);
}
#endif

#if HAVE_INT8
// weights, weight_scale, weight_sum: prepare_float_weights_int8(filter)'s three arrays; the weights'
// type names the form (int8: VNNI's, on CPUs with INT8_FEATURE; int16: the pairs form, AVX2 builds).
static void conv2d_int8_vnni(Array<float> input, Array<int8_t> weights, Array<float> weight_scale,
                              Array<int32_t> weight_sum, Array<float> bias, std::vector<int> geometry, float lo,
                              float hi, std::vector<Array<float>> residual, Array<float> input_multiplier,
                              Array<float> input_bias, float input_lo, float input_hi, py::array output,
                              std::vector<int> pool_window, std::vector<float> input_range,
                              py::object packed, Array<float> pack_multiplier, Array<float> pack_bias,
                              py::object requantize, py::list input_requantize, py::object residual_requantize) {
#if HAVE_VNNI
  if (!cpu_runs_vnni())
    throw std::runtime_error("conv2d_int8: int8 weights are the VNNI form, and this CPU has no " INT8_FEATURE);
  conv2d_impl<Precision::kInt8>(input, weights, weight_scale, weight_sum, bias, geometry, lo, hi, residual,
                                input_multiplier, input_bias, input_lo, input_hi, output, pool_window, input_range,
                                packed, pack_multiplier, pack_bias, requantize, input_requantize, residual_requantize);
#else
  throw std::runtime_error("conv2d_int8: int8 weights are the VNNI form, and these kernels were built without it");
#endif
}

#if HAVE_INT8_PAIRS
static void conv2d_int8_pairs(Array<float> input, Array<int16_t> weights, Array<float> weight_scale,
                              Array<int32_t> weight_sum, Array<float> bias, std::vector<int> geometry, float lo,
                              float hi, std::vector<Array<float>> residual, Array<float> input_multiplier,
                              Array<float> input_bias, float input_lo, float input_hi, py::array output,
                              std::vector<int> pool_window, std::vector<float> input_range,
                              py::object packed, Array<float> pack_multiplier, Array<float> pack_bias,
                              py::object requantize, py::list input_requantize, py::object residual_requantize) {
  conv2d_impl<Precision::kInt8Pairs>(input, weights, weight_scale, weight_sum, bias, geometry, lo, hi, residual,
                                     input_multiplier, input_bias, input_lo, input_hi, output, pool_window,
                                     input_range, packed, pack_multiplier, pack_bias, requantize, input_requantize,
                                     residual_requantize);
}
#endif
#endif

// ---------------------------------------------------------------------------------------------
// Element-wise: out = clamp(a (op) b) where b is a full tensor, a per-channel vector or a scalar.
static void binary_elementwise(Array<float> a, Array<float> b, int op, float lo, float hi, py::array out) {
  const int64_t n = a.size(), nb = b.size();
  if (out.size() != n || (nb != n && (nb == 0 || (nb != 1 && n % nb != 0)))) throw std::invalid_argument("elementwise: shapes");
  if (n == 0) return;
  const float* x = a.data();
  const float* z = b.data();
  float* o = checked_data<float>(out, -1, true, "binary_elementwise output");
  py::gil_scoped_release release;
  // A full tensor or a scalar: flat chunks; a per-channel vector: rows of nb channels.
  const int64_t row = (nb == n || nb == 1) ? std::min<int64_t>(n, 16384) : nb;
  const int64_t rows = (n + row - 1) / row;
  const int tasks = static_cast<int>(std::min<int64_t>(rows, 256));
  pool().parallel_for(tasks, [&](int t0, int t1) {
    const int64_t begin = rows * t0 / tasks * row, end = std::min(n, rows * t1 / tasks * row);
    if (nb == n) {
      if (op == 0)
        for (int64_t i = begin; i < end; ++i) o[i] = std::min(std::max(x[i] + z[i], lo), hi);
      else
        for (int64_t i = begin; i < end; ++i) o[i] = std::min(std::max(x[i] * z[i], lo), hi);
    } else if (nb == 1) {
      const float s = z[0];
      if (op == 0)
        for (int64_t i = begin; i < end; ++i) o[i] = std::min(std::max(x[i] + s, lo), hi);
      else
        for (int64_t i = begin; i < end; ++i) o[i] = std::min(std::max(x[i] * s, lo), hi);
    } else {
      for (int64_t r = begin; r < end; r += nb) {
        if (op == 0)
          for (int64_t i = 0; i < nb; ++i) o[r + i] = std::min(std::max(x[r + i] + z[i], lo), hi);
        else
          for (int64_t i = 0; i < nb; ++i) o[r + i] = std::min(std::max(x[r + i] * z[i], lo), hi);
      }
    }
  });
}

static void requantize(Array<float> a, Array<float> b, Array<float> scale, Array<float> shift, int op, float add,
                       float lo, float hi, float subtract, bool round, py::array out) {
  const int64_t n = a.size(), channels = scale.size();
  if (channels == 0 || shift.size() != channels || n % channels != 0 || out.size() != n ||
      (op != 0 && b.size() != n) || op < 0 || op > 2)
    throw std::invalid_argument("requantize: shapes");
  if (round && !(lo <= hi && lo > -8388608.0f && hi < 8388608.0f)) throw std::invalid_argument("requantize: range");
  if (n == 0) return;
  const float* x = a.data();
  const float* y = op != 0 ? b.data() : nullptr;
  const float* s = scale.data();
  const float* t = shift.data();
  float* o = checked_data<float>(out, -1, true, "requantize output");
  auto rows_fn = op == 0 ? (round ? &requantize_rows<0, true> : &requantize_rows<0, false>)
                 : op == 1 ? (round ? &requantize_rows<1, true> : &requantize_rows<1, false>)
                           : (round ? &requantize_rows<2, true> : &requantize_rows<2, false>);
  py::gil_scoped_release release;
  int64_t rows = n / channels, width = channels;
  // Few channels (an image's 3 at the QUANTIZE in): rows of `group` pixels, the constants repeated,
  // so that the loop over a row runs long enough to be vectorised (the 256x256x3 QUANTIZE 0.36 ms
  // a row a pixel); the rows left over, fewer than a group, as they are.
  const int64_t group = std::max<int64_t>(1, 64 / channels), grouped = rows / group * group;
  std::vector<float> s_group, t_group;
  if (group > 1 && grouped > 0) {
    for (int64_t i = 0; i < group; ++i) {
      s_group.insert(s_group.end(), s, s + channels);
      t_group.insert(t_group.end(), t, t + channels);
    }
    const int64_t tail = (rows - grouped) * channels, start = grouped * channels;
    if (tail > 0)
      rows_fn(x + start, y ? y + start : nullptr, s, t, 0, rows - grouped, channels, add, lo, hi, subtract, o + start);
    rows = grouped / group;
    width = group * channels;
    s = s_group.data();
    t = t_group.data();
  }
  const int64_t per_task = std::max<int64_t>(1, 16384 / width);
  const int tasks = static_cast<int>(std::min<int64_t>((rows + per_task - 1) / per_task, 256));
  pool().parallel_for(tasks, [&](int t0, int t1) {
    rows_fn(x, y, s, t, rows * t0 / tasks, rows * t1 / tasks, width, add, lo, hi, subtract, o);
  });
}

// MAX_POOL_2D (kind 0) and AVERAGE_POOL_2D (kind 1, the mean of the taps inside the image, as
// TFLite computes it), with the fused activation clamp.
// packed (optional): the output's bits for the LceQuantize that reads it (RowPack), each row as it is written.
static void pool2d(Array<float> input, std::vector<int> geometry, int kind, float lo, float hi, py::array output,
                   py::object packed, Array<float> pack_multiplier, Array<float> pack_bias) {
  if (geometry.size() != 6 || input.ndim() != 4) throw std::invalid_argument("pool2d: geometry needs 6 numbers, input 4-d");
  float* y = checked_data<float>(output, 4, true, "pool2d output");
  const int fh = geometry[0], fw = geometry[1], sh = geometry[2], sw = geometry[3], pt = geometry[4], pl = geometry[5];
  const int batch = static_cast<int>(input.shape(0)), height = static_cast<int>(input.shape(1));
  const int width = static_cast<int>(input.shape(2)), channels = static_cast<int>(input.shape(3));
  const int out_h = static_cast<int>(output.shape(1)), out_w = static_cast<int>(output.shape(2));
  if (output.shape(0) != batch || output.shape(3) != channels)
    throw std::invalid_argument("pool2d: output batch or channels differ from the input's");
  const float* x = input.data();
  const RowPack pack = row_pack(packed, pack_multiplier, pack_bias, static_cast<int64_t>(batch) * out_h * out_w,
                                channels, "pool2d");
  py::gil_scoped_release release;
  pool().parallel_for(batch * out_h, [&](int r0, int r1) {
    static thread_local std::vector<const float*> taps;  // per thread, kept: fn runs once per chunk
    taps.resize(static_cast<size_t>(fh) * fw);
    for (int r = r0; r < r1; ++r) {
      const int b = r / out_h, oy = r % out_h;
      for (int ox = 0; ox < out_w; ++ox) {
        int count = 0;  // the taps inside the input, in order
        for (int fy = 0; fy < fh; ++fy)
          for (int fx = 0; fx < fw; ++fx) {
            const int iy = oy * sh - pt + fy, ix = ox * sw - pl + fx;
            if (iy < 0 || iy >= height || ix < 0 || ix >= width) continue;
            taps[count++] = x + ((static_cast<int64_t>(b) * height + iy) * width + ix) * channels;
          }
        float* dst = y + ((static_cast<int64_t>(b) * out_h + oy) * out_w + ox) * channels;
        const float scale = kind == 0 ? 1.0f : 1.0f / static_cast<float>(std::max(count, 1));
        pool_pixel<true>(kind, taps.data(), count, channels, scale, lo, hi, dst);
      }
      pack(y + static_cast<int64_t>(r) * out_w * channels, static_cast<int64_t>(r) * out_w, out_w);
    }
  });
}

// DEPTHWISE_CONV_2D in float32 with a depth multiplier of 1: out[c] = bias[c] plus x[c] *
// filters[fy, fx, c] for each tap inside the input, then the fused activation clamp [lo, hi].
// filters: [fh, fw, channels] (TFLite's [1, fh, fw, channels]); geometry as conv2d's (filter_h,
// filter_w, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left); padding taps contribute
// nothing.
//
// The input is first copied with its padding written out (zeros) and each row's pixels split by
// column phase (x mod stride_w), so that for any stride the pixels one tap reads for an output
// row's consecutive pixels are consecutive in the copy. An output row is then one long run over its
// pixels' channels, summed kDepthwiseRun values at a time in registers over every tap (the weights
// tiled along the run, read from an offset of j mod channels), so that the loops vectorise whatever
// the channel count (BlazeFace's are 24 to 128) and each sum is stored once.
constexpr int kDepthwiseVectors = 4;  // a run: 4 vectors of each output row
constexpr int kDepthwiseRun = kDepthwiseVectors * kFloatLanes;
constexpr int kDepthwiseRows = kFloatLanes == 16 ? 4 : 2;  // rows summed at once (AVX-512 has 32 registers)

// Rows output[0..R) of a depthwise convolution (each `row` values long, R output rows apart by
// `row_step` values of the padded copy): each run of kDepthwiseRun values of the R rows summed in
// registers over every tap, each tap's weights loaded once for the R rows.
template <int R>
static inline void depthwise_rows(const float* top, int64_t row_step, const int64_t* tap_start, int taps,
                                  const float* weights, int period, int channels, int64_t row, float lo, float hi,
                                  float* out) {
  const vfloat lo_v = vfloat{} + lo, hi_v = vfloat{} + hi;
  for (int64_t j0 = 0; j0 < row; j0 += kDepthwiseRun) {
    const float* w = weights + j0 % channels;  // the weights of this run's first value's channel
    vfloat acc[R][kDepthwiseVectors];
    for (int v = 0; v < kDepthwiseVectors; ++v) {
      const vfloat bias = load_v(w + v * kFloatLanes);
      for (int r = 0; r < R; ++r) acc[r][v] = bias;
    }
    for (int t = 0; t < taps; ++t) {
      w += period;
      vfloat wv[kDepthwiseVectors];
      for (int v = 0; v < kDepthwiseVectors; ++v) wv[v] = load_v(w + v * kFloatLanes);
      for (int r = 0; r < R; ++r) {
        const float* src = top + r * row_step + tap_start[t] + j0;
        for (int v = 0; v < kDepthwiseVectors; ++v) acc[r][v] += load_v(src + v * kFloatLanes) * wv[v];
      }
    }
    const int64_t count = std::min<int64_t>(kDepthwiseRun, row - j0);
    for (int r = 0; r < R; ++r) {
      float clamped[kDepthwiseRun];
      for (int v = 0; v < kDepthwiseVectors; ++v) {
        const vfloat a = acc[r][v] < lo_v ? lo_v : acc[r][v];  // NaN stays
        store_v(clamped + v * kFloatLanes, a > hi_v ? hi_v : a);
      }
      std::memcpy(out + r * row + j0, clamped, sizeof(float) * count);
    }
  }
}

static void depthwise_conv2d(Array<float> input, Array<float> filters, Array<float> bias, std::vector<int> geometry,
                             float lo, float hi, py::array output) {
  if (geometry.size() != 8 || input.ndim() != 4 || filters.ndim() != 3)
    throw std::invalid_argument("depthwise_conv2d: geometry needs 8 numbers, input 4-d, filters [fh, fw, channels]");
  float* y = checked_data<float>(output, 4, true, "depthwise_conv2d output");
  const int fh = geometry[0], fw = geometry[1], sh = geometry[2], sw = geometry[3];
  const int dh = geometry[4], dw = geometry[5], pt = geometry[6], pl = geometry[7];
  const int batch = static_cast<int>(input.shape(0)), height = static_cast<int>(input.shape(1));
  const int width = static_cast<int>(input.shape(2)), channels = static_cast<int>(input.shape(3));
  const int out_h = static_cast<int>(output.shape(1)), out_w = static_cast<int>(output.shape(2));
  if (output.shape(0) != batch || output.shape(3) != channels || filters.shape(0) != fh || filters.shape(1) != fw ||
      filters.shape(2) != channels || bias.size() != channels)
    throw std::invalid_argument("depthwise_conv2d: output, filter or bias shape differs from the input's channels");
  if (fh < 1 || fw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1)
    throw std::invalid_argument("depthwise_conv2d: filter size, strides and dilations must be positive");
  if (batch == 0 || out_h == 0 || out_w == 0 || channels == 0) return;
  const float* x = input.data();
  const float* f = filters.data();
  const float* bs = bias.data();
  // the bias, then each tap's weights, repeated along channels + kDepthwiseRun values
  const int taps = fh * fw, period = channels + kDepthwiseRun;
  std::vector<float> tiled(static_cast<size_t>(taps + 1) * period);
  for (int t = 0; t <= taps; ++t)
    for (int i = 0; i < period; ++i)
      tiled[static_cast<size_t>(t) * period + i] = t == 0 ? bs[i % channels] : f[(t - 1) * channels + i % channels];
  // the padded copy: rows padded_h, each sw phases of phase_w pixels (phase p holds columns p, p +
  // sw, ...), and one run's slack at the end (read past the last row, never stored)
  const int padded_h = (out_h - 1) * sh + (fh - 1) * dh + 1;
  const int phase_w = ((out_w - 1) * sw + (fw - 1) * dw + 1 + sw - 1) / sw;
  const int64_t padded_row = static_cast<int64_t>(sw) * phase_w * channels;
  static thread_local std::vector<float> padded;
  padded.resize(static_cast<size_t>(batch) * padded_h * padded_row + kDepthwiseRun);
  float* const copy = padded.data();
  const float* const weights = tiled.data();
  py::gil_scoped_release release;
  pool().parallel_for(batch * padded_h, [&](int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
      const int b = r / padded_h, iy = r % padded_h - pt;
      float* dst = copy + static_cast<int64_t>(r) * padded_row;
      if (iy < 0 || iy >= height) {
        std::memset(dst, 0, sizeof(float) * padded_row);
        continue;
      }
      const float* src = x + (static_cast<int64_t>(b) * height + iy) * width * channels;
      for (int p = 0; p < sw; ++p) {
        // the pixels q of phase p inside the input: 0 <= q * sw + p - pl < width
        const int q0 = std::min(phase_w, std::max(0, (pl - p + sw - 1) / sw));
        const int q1 = std::max(q0, std::min(phase_w, (width + pl - p + sw - 1) / sw));
        float* d = dst + static_cast<int64_t>(p) * phase_w * channels;
        std::memset(d, 0, sizeof(float) * q0 * channels);
        std::memset(d + static_cast<int64_t>(q1) * channels, 0, sizeof(float) * (phase_w - q1) * channels);
        const float* s = src + static_cast<int64_t>(q0 * sw + p - pl) * channels;
        if (sw == 1) {
          std::memcpy(d + static_cast<int64_t>(q0) * channels, s, sizeof(float) * (q1 - q0) * channels);
        } else {
          for (int q = q0; q < q1; ++q, s += static_cast<int64_t>(sw) * channels)
            for (int c = 0; c < channels; ++c) d[static_cast<int64_t>(q) * channels + c] = s[c];
        }
      }
    }
  });
  // where each tap's values for output pixel 0 start, from the output row's first padded row
  std::vector<int64_t> tap_start(taps);
  for (int fy = 0; fy < fh; ++fy)
    for (int fx = 0; fx < fw; ++fx) {
      const int column = fx * dw;  // phase column % sw, pixel column / sw of that phase
      tap_start[fy * fw + fx] = static_cast<int64_t>(fy) * dh * padded_row +
                                (static_cast<int64_t>(column % sw) * phase_w + column / sw) * channels;
    }
  const int64_t row = static_cast<int64_t>(out_w) * channels;
  const int groups = (out_h + kDepthwiseRows - 1) / kDepthwiseRows;  // of kDepthwiseRows output rows
  pool().parallel_for(batch * groups, [&](int g0, int g1) {
    for (int g = g0; g < g1; ++g) {
      const int b = g / groups, oy = g % groups * kDepthwiseRows, rows = std::min(kDepthwiseRows, out_h - oy);
      const int64_t row_step = static_cast<int64_t>(sh) * padded_row;
      const float* top = copy + (static_cast<int64_t>(b) * padded_h) * padded_row + oy * row_step;
      float* out = y + (static_cast<int64_t>(b) * out_h + oy) * row;
      if (rows == kDepthwiseRows) {
        depthwise_rows<kDepthwiseRows>(top, row_step, tap_start.data(), taps, weights, period, channels, row, lo, hi,
                                       out);
      } else {
        for (int r = 0; r < rows; ++r)
          depthwise_rows<1>(top + r * row_step, row_step, tap_start.data(), taps, weights, period, channels, row, lo,
                            hi, out + r * row);
      }
    }
  });
}

// CONCATENATION along the channel axis: each pixel's channels are the parts' channels in order;
// with a residual (same shape as the output), the ADD that follows is done in the same pass.
static void concat_channels(std::vector<Array<float>> parts, Array<float> residual, py::array output) {
  const int total = static_cast<int>(output.shape(output.ndim() - 1));
  const int64_t pixels = output.size() / std::max(total, 1);
  std::vector<const float*> sources;
  std::vector<int> widths;
  int sum = 0;
  for (auto& part : parts) {
    const int width = static_cast<int>(part.shape(part.ndim() - 1));
    if (part.size() != pixels * width) throw std::invalid_argument("concat_channels: part shapes differ");
    sources.push_back(part.data());
    widths.push_back(width);
    sum += width;
  }
  if (sum != total) throw std::invalid_argument("concat_channels: channel counts do not add up");
  const bool add = residual.size() > 0;
  if (add && residual.size() != output.size()) throw std::invalid_argument("concat_channels: residual shape");
  const float* res = residual.data();
  float* out = checked_data<float>(output, -1, true, "concat_channels output");
  py::gil_scoped_release release;
  const int tasks = static_cast<int>(std::min<int64_t>(pixels, 256));
  pool().parallel_for(tasks, [&](int t0, int t1) {
    for (int64_t p = pixels * t0 / tasks; p < pixels * t1 / tasks; ++p) {
      float* dst = out + p * total;
      const float* r = res + p * total;
      for (size_t i = 0; i < sources.size(); ++i) {
        const float* src = sources[i] + p * widths[i];
        if (add)
          for (int c = 0; c < widths[i]; ++c) dst[c] = src[c] + r[c];
        else
          std::memcpy(dst, src, sizeof(float) * widths[i]);
        dst += widths[i];
        r += widths[i];
      }
    }
  });
}

// RESIZE_NEAREST_NEIGHBOR: out[b, y, x] = in[b, rows[y], cols[x]] (the source indices computed by
// the caller); with a residual (same shape as the output), the ADD that follows and its clamp are
// done in the same pass; requantize (None or RowRequantize's 6 values, with a residual): an int8
// file's ADD instead, on codes, as requantize's op 1 computes it (the resized codes times `scale`,
// the residual's times `shift`: a sum's two products in either order give the same float).
// packed (optional): the output's bits for the LceQuantize that reads it (RowPack), each row as it is written.
static void resize_nearest(Array<float> input, Array<int32_t> rows, Array<int32_t> cols, Array<float> residual,
                           float lo, float hi, py::array output, py::object packed, Array<float> pack_multiplier,
                           Array<float> pack_bias, py::object requantize) {
  const int batch = static_cast<int>(input.shape(0)), height = static_cast<int>(input.shape(1));
  const int width = static_cast<int>(input.shape(2)), channels = static_cast<int>(input.shape(3));
  const int out_h = static_cast<int>(output.shape(1)), out_w = static_cast<int>(output.shape(2));
  if (rows.size() != out_h || cols.size() != out_w || output.shape(0) != batch || output.shape(3) != channels)
    throw std::invalid_argument("resize_nearest: shapes");
  const bool add = residual.size() > 0;
  if (add && residual.size() != output.size()) throw std::invalid_argument("resize_nearest: residual shape");
  const int32_t* ry = rows.data();
  const int32_t* rx = cols.data();
  for (int i = 0; i < out_h; ++i)
    if (ry[i] < 0 || ry[i] >= height) throw std::invalid_argument("resize_nearest: row index");
  for (int i = 0; i < out_w; ++i)
    if (rx[i] < 0 || rx[i] >= width) throw std::invalid_argument("resize_nearest: column index");
  const float* x = input.data();
  const float* res = residual.data();
  float* y = checked_data<float>(output, 4, true, "resize_nearest output");
  const RowPack pack = row_pack(packed, pack_multiplier, pack_bias, static_cast<int64_t>(batch) * out_h * out_w,
                                channels, "resize_nearest");
  const RowRequantize codes = row_requantize(requantize, channels, "resize_nearest");
  if (codes.scale && !add) throw std::invalid_argument("resize_nearest: requantize needs a residual");
  py::gil_scoped_release release;
  pool().parallel_for(batch * out_h, [&](int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
      const int b = r / out_h, oy = r % out_h;
      const float* src_row = x + (static_cast<int64_t>(b) * height + ry[oy]) * width * channels;
      for (int ox = 0; ox < out_w; ++ox) {
        const float* src = src_row + static_cast<int64_t>(rx[ox]) * channels;
        const int64_t at = (static_cast<int64_t>(r) * out_w + ox) * channels;
        if (codes.scale)  // the int8 ADD: requantize's op 1, the resized codes times scale, the residual's times shift
          requantize_rows<1, true>(src, res + at, codes.scale, codes.shift, 0, 1, channels, codes.add, codes.lo,
                                   codes.hi, codes.subtract, y + at);
        else if (add)
          for (int c = 0; c < channels; ++c) y[at + c] = std::min(std::max(src[c] + res[at + c], lo), hi);
        else
          std::memcpy(y + at, src, sizeof(float) * channels);
      }
      pack(y + static_cast<int64_t>(r) * out_w * channels, static_cast<int64_t>(r) * out_w, out_w);
    }
  });
}

// RESIZE_BILINEAR: each output value from the two source rows top[y] and bottom[y] (weights 1 -
// down[y] and down[y]) and, in them, the two columns left[x] and right[x] (1 - across[x] and
// across[x]), summed along the rows first, then along the columns (the taps are TFLite's, as
// ops._bilinear_taps computes them).
static void resize_bilinear(Array<float> input, Array<int32_t> top, Array<int32_t> bottom, Array<float> down,
                            Array<int32_t> left, Array<int32_t> right, Array<float> across, py::array output) {
  if (input.ndim() != 4) throw std::invalid_argument("resize_bilinear: the input must be 4-d");
  float* y = checked_data<float>(output, 4, true, "resize_bilinear output");
  const int batch = static_cast<int>(input.shape(0)), height = static_cast<int>(input.shape(1));
  const int width = static_cast<int>(input.shape(2)), channels = static_cast<int>(input.shape(3));
  const int out_h = static_cast<int>(output.shape(1)), out_w = static_cast<int>(output.shape(2));
  if (top.size() != out_h || bottom.size() != out_h || down.size() != out_h || left.size() != out_w ||
      right.size() != out_w || across.size() != out_w || output.shape(0) != batch || output.shape(3) != channels)
    throw std::invalid_argument("resize_bilinear: shapes");
  const int32_t *t = top.data(), *bt = bottom.data(), *l = left.data(), *rt = right.data();
  for (int i = 0; i < out_h; ++i)
    if (t[i] < 0 || t[i] >= height || bt[i] < 0 || bt[i] >= height)
      throw std::invalid_argument("resize_bilinear: row index");
  for (int i = 0; i < out_w; ++i)
    if (l[i] < 0 || l[i] >= width || rt[i] < 0 || rt[i] >= width)
      throw std::invalid_argument("resize_bilinear: column index");
  const float* x = input.data();
  const float* dn = down.data();
  const float* ac = across.data();
  const int64_t row = static_cast<int64_t>(width) * channels;
  py::gil_scoped_release release;
  pool().parallel_for(batch * out_h, [&](int r0, int r1) {
    static thread_local std::vector<float> along;  // the output row's source row, summed along the rows
    along.resize(static_cast<size_t>(row));
    float* __restrict mixed = along.data();
    for (int r = r0; r < r1; ++r) {
      const int b = r / out_h, oy = r % out_h;
      const float* __restrict upper = x + (static_cast<int64_t>(b) * height + t[oy]) * row;
      const float* __restrict lower = x + (static_cast<int64_t>(b) * height + bt[oy]) * row;
      const float d = dn[oy], e = 1.0f - d;
      for (int64_t j = 0; j < row; ++j) mixed[j] = upper[j] * e + lower[j] * d;
      float* __restrict dst = y + static_cast<int64_t>(r) * out_w * channels;
      for (int ox = 0; ox < out_w; ++ox, dst += channels) {
        const float* p = mixed + static_cast<int64_t>(l[ox]) * channels;
        const float* q = mixed + static_cast<int64_t>(rt[ox]) * channels;
        const float g = ac[ox], h = 1.0f - g;
        for (int c = 0; c < channels; ++c) dst[c] = p[c] * h + q[c] * g;
      }
    }
  });
}

// The heatmaps' peaks, as runtime.decoding computes them in NumPy (bit for bit): for each image b and
// map k of heatmaps (B, H, W, K), the pixel of its largest value (the first in row-major order on a
// tie; the first NaN where there is one, as numpy.argmax), moved a quarter pixel towards the larger
// of its two neighbours along each axis (none where they are equal or one is outside the map; NaN
// where their difference is): points (B, K, 2) float32 (x, y) in heatmap pixels, scores (B, K)
// the peak values. One pass over the maps, the K maps of a pixel side by side in vectors.
static void heatmap_peaks(Array<float> heatmaps, py::array points, py::array scores) {
  if (heatmaps.ndim() != 4) throw std::invalid_argument("heatmap_peaks: heatmaps must be (B, H, W, K)");
  const int batch = static_cast<int>(heatmaps.shape(0)), height = static_cast<int>(heatmaps.shape(1));
  const int width = static_cast<int>(heatmaps.shape(2)), maps = static_cast<int>(heatmaps.shape(3));
  float* xy = checked_data<float>(points, 3, true, "heatmap_peaks points");
  float* peak = checked_data<float>(scores, 2, true, "heatmap_peaks scores");
  if (points.shape(0) != batch || points.shape(1) != maps || points.shape(2) != 2 || scores.shape(0) != batch ||
      scores.shape(1) != maps)
    throw std::invalid_argument("heatmap_peaks: points must be (B, K, 2) and scores (B, K)");
  if (static_cast<int64_t>(height) * width == 0 && batch * maps > 0)
    throw std::invalid_argument("heatmap_peaks: empty heatmaps");
  typedef int32_t vindex __attribute__((vector_size(kFloatLanes * 4)));
  const float* h = heatmaps.data();
  const int pixels = height * width;
  py::gil_scoped_release release;
  std::vector<int32_t> best_at(maps);
  std::vector<int> starts;
  std::vector<vfloat> best_v;
  std::vector<vindex> at_v;
  for (int b = 0; b < batch; ++b) {
    const float* image = h + static_cast<int64_t>(b) * pixels * maps;
    if (maps >= kFloatLanes) {
      // vectors of kFloatLanes maps side by side, all of them updated pixel by pixel (one pass
      // over the maps); the last vector ends at the last map, overlapping the one before where
      // kFloatLanes does not divide the count (each lane's result is its own map's)
      starts.clear();
      for (int k = 0; k + kFloatLanes <= maps; k += kFloatLanes) starts.push_back(k);
      if (maps % kFloatLanes) starts.push_back(maps - kFloatLanes);
      const size_t vectors = starts.size();
      best_v.resize(vectors);
      at_v.resize(vectors);
      for (size_t j = 0; j < vectors; ++j) {
        std::memcpy(&best_v[j], image + starts[j], sizeof(vfloat));
        at_v[j] = vindex{} + 0;
      }
      for (int p = 1; p < pixels; ++p) {
        const float* row = image + static_cast<int64_t>(p) * maps;
        for (size_t j = 0; j < vectors; ++j) {
          vfloat v;
          std::memcpy(&v, row + starts[j], sizeof(v));
          const vindex take = ((v > best_v[j]) | (v != v)) & (best_v[j] == best_v[j]);
          best_v[j] = take ? v : best_v[j];
          at_v[j] = take ? (vindex{} + p) : at_v[j];
        }
      }
      for (size_t j = 0; j < vectors; ++j) std::memcpy(best_at.data() + starts[j], &at_v[j], sizeof(vindex));
    } else {
      for (int k = 0; k < maps; ++k) {
        float best = image[k];
        int at = 0;
        for (int p = 1; p < pixels && best == best; ++p) {
          const float v = image[static_cast<int64_t>(p) * maps + k];
          if (v > best || v != v) {
            best = v;
            at = p;
          }
        }
        best_at[k] = at;
      }
    }
    for (int k = 0; k < maps; ++k) {
      const int y = best_at[k] / width, x = best_at[k] % width;
      auto value = [&](int yy, int xx) { return image[(static_cast<int64_t>(yy) * width + xx) * maps + k]; };
      auto sign = [](float d) { return d > 0.0f ? 1.0f : d < 0.0f ? -1.0f : d == 0.0f ? 0.0f : d; };
      const float shift_x = x > 0 && x < width - 1 ? sign(value(y, x + 1) - value(y, x - 1)) : 0.0f;
      const float shift_y = y > 0 && y < height - 1 ? sign(value(y + 1, x) - value(y - 1, x)) : 0.0f;
      const int64_t out = static_cast<int64_t>(b) * maps + k;
      xy[2 * out] = static_cast<float>(x) + 0.25f * shift_x;
      xy[2 * out + 1] = static_cast<float>(y) + 0.25f * shift_y;
      peak[out] = value(y, x);
    }
  }
}

// Crops of one (H, W, C) uint8 image, (N, size, size, C) float32 in [0, 1], as cropping.warp_crops
// (NumPy) and TensorFlow's ImageProjectiveTransformV3 compute them, bit for bit: crop pixel (x, y)
// reads the image at ((p0 x + p1 y + p2) / d, (p3 x + p4 y + p5) / d), d = p6 x + p7 y + 1,
// bilinearly, 0 outside; every product rounded on its own (no FMA), in NumPy's order.
static py::array_t<float> warp_crops(Array<uint8_t> image, Array<float> params, int size) {
  if (image.ndim() != 3) throw std::invalid_argument("warp_crops: image must be (H, W, C)");
  if (params.ndim() != 2 || params.shape(1) != 8) throw std::invalid_argument("warp_crops: params must be (N, 8)");
  if (size < 1) throw std::invalid_argument("warp_crops: size must be at least 1");
  const int height = static_cast<int>(image.shape(0)), width = static_cast<int>(image.shape(1));
  const int channels = static_cast<int>(image.shape(2)), count = static_cast<int>(params.shape(0));
  py::array_t<float> output({static_cast<py::ssize_t>(count), static_cast<py::ssize_t>(size),
                             static_cast<py::ssize_t>(size), static_cast<py::ssize_t>(channels)});
  const uint8_t* pixels = image.data();
  const float* p = params.data();
  float* out = output.mutable_data();
  // a byte's value as tf.image.convert_image_dtype scales it (the product rounded as below)
  float scaled[256];
  for (int u = 0; u < 256; ++u) scaled[u] = rounded_product(static_cast<float>(u), 1.0f / 255.0f);
  // Where crop pixel (xs, ys) of crop n reads: the image column, row and weights of its corners.
  // Upright crops (p1 = p3 = p6 = p7 = 0, as the Predictor's are) read x from the column alone
  // and y from the row alone: the terms of the other coordinate are zeros of one sign whatever
  // it is and the projection is 1, so the values are those of the whole formula at (xs, 0) and
  // (0, ys), computed once a column and once a row.
  struct Axis {
    int index[2];  // the two neighbours' index (0 where outside)
    float weight[2];  // their weights (0 where outside)
  };
  auto axis = [](float v, int limit) {
    const float v0 = std::floor(v), v1 = v0 + 1.0f;
    const bool in0 = v0 >= 0 && v0 < limit, in1 = v1 >= 0 && v1 < limit;
    return Axis{{in0 ? static_cast<int>(v0) : 0, in1 ? static_cast<int>(v1) : 0},
                {in0 ? v1 - v : 0.0f, in1 ? v - v0 : 0.0f}};
  };
  auto position = [](const float* t, float xs, float ys) {
    const float d = rounded_product(t[6], xs) + rounded_product(t[7], ys) + 1.0f;
    return std::make_pair((rounded_product(t[0], xs) + rounded_product(t[1], ys) + t[2]) / d,
                          (rounded_product(t[3], xs) + rounded_product(t[4], ys) + t[5]) / d);
  };
  py::gil_scoped_release release;
  pool().parallel_for(count * size, [&](int r0, int r1) {
    static thread_local std::vector<Axis> columns;  // an upright crop's, per thread
    int columns_of = -1;  // the crop they are of
    columns.resize(size);
    for (int r = r0; r < r1; ++r) {
      const int n = r / size;
      const float ys = static_cast<float>(r % size);
      const float* t = p + 8 * static_cast<int64_t>(n);
      const bool upright = t[1] == 0.0f && t[3] == 0.0f && t[6] == 0.0f && t[7] == 0.0f;
      if (upright && columns_of != n) {
        for (int ix = 0; ix < size; ++ix) columns[ix] = axis(position(t, static_cast<float>(ix), 0.0f).first, width);
        columns_of = n;
      }
      const Axis row_axis = upright ? axis(position(t, 0.0f, ys).second, height) : Axis{};
      float* row = out + static_cast<int64_t>(r) * size * channels;
      for (int ix = 0; ix < size; ++ix) {
        Axis cx = upright ? columns[ix] : Axis{}, cy = row_axis;
        if (!upright) {
          const auto xy = position(t, static_cast<float>(ix), ys);
          cx = axis(xy.first, width);
          cy = axis(xy.second, height);
        }
        const uint8_t* corner[2][2];  // (row, column)
        for (int a = 0; a < 2; ++a)
          for (int b = 0; b < 2; ++b)
            corner[a][b] = pixels + (static_cast<int64_t>(cy.index[a]) * width + cx.index[b]) * channels;
        float* o = row + static_cast<int64_t>(ix) * channels;
        for (int c = 0; c < channels; ++c) {
          const float top = rounded_product(cx.weight[0], scaled[corner[0][0][c]]) +
                            rounded_product(cx.weight[1], scaled[corner[0][1][c]]);
          const float bottom = rounded_product(cx.weight[0], scaled[corner[1][0][c]]) +
                               rounded_product(cx.weight[1], scaled[corner[1][1][c]]);
          o[c] = rounded_product(cy.weight[0], top) + rounded_product(cy.weight[1], bottom);
        }
      }
    }
  });
  return output;
}

static int set_num_threads(int threads) {
  pool().resize(threads);
  return pool().size();
}

PYBIND11_MODULE(RUNTIME_MODULE, m) {
  m.doc() = "larq_landmarks.runtime kernels";
  m.attr("path") = kPath;
  m.attr("binary_channel_block") = kBinaryChannelBlock;
  m.def("set_num_threads", &set_num_threads);
  m.def("bitpack", &bitpack);
  m.def("unpack", &unpack);
  m.def("prepare_binary_weights", &prepare_binary_weights);
  py::class_<BinaryConv2D>(m, "BinaryConv2D", py::module_local())  // one class per module (three builds)
      .def("__call__", &BinaryConv2D::operator(), py::arg("input"), py::arg("output"), py::arg("pad_top"),
           py::arg("pad_left"), py::arg("next_bits") = py::none(), py::arg("channel_offset") = py::none(),
           py::arg("residual") = py::none());
  m.def("binary_conv2d", [](Array<int32_t> weights, std::vector<int> geometry, Array<float> multiplier,
                            Array<float> bias, int clamp_min, int clamp_max, Array<int32_t> thresholds,
                            Array<int32_t> weight_popcounts, Array<float> next_scale, Array<float> next_shift,
                            bool pack_next, std::vector<float> output_zero_point, std::vector<float> residual_add) {
    return BinaryConv2D(weights, geometry, multiplier, bias, clamp_min, clamp_max, thresholds, weight_popcounts,
                        next_scale, next_shift, pack_next, output_zero_point, residual_add);
  }, py::arg("weights"), py::arg("geometry"), py::arg("multiplier"), py::arg("bias"), py::arg("clamp_min"),
        py::arg("clamp_max"), py::arg("thresholds"), py::arg("weight_popcounts"),
        py::arg("next_scale") = py::array_t<float>(0), py::arg("next_shift") = py::array_t<float>(0),
        py::arg("pack_next") = false, py::arg("output_zero_point") = std::vector<float>(),
        py::arg("residual_add") = std::vector<float>());
  m.def("prepare_float_weights", &prepare_float_weights);
  m.def("conv2d", &conv2d, py::arg("input"), py::arg("weights"),
        py::arg("bias"), py::arg("geometry"), py::arg("lo"), py::arg("hi"),
        py::arg("residual"), py::arg("input_multiplier"), py::arg("input_bias"), py::arg("input_lo"),
        py::arg("input_hi"), py::arg("output"), py::arg("pool_window") = std::vector<int>(),
        py::arg("packed") = py::none(), py::arg("pack_multiplier") = py::array_t<float>(0),
        py::arg("pack_bias") = py::array_t<float>(0), py::arg("requantize") = py::none(), py::arg("input_requantize") = py::list(),
        py::arg("residual_requantize") = py::none());
#if HAVE_BF16  // bfloat16 float convolutions: AVX-512 builds, CPUs with AVX512_BF16 (cpu_supports)
  m.def("prepare_float_weights_bf16", &prepare_float_weights_bf16);
  m.def("conv2d_bf16", &conv2d_bf16, py::arg("input"), py::arg("weights"),
        py::arg("bias"), py::arg("geometry"), py::arg("lo"), py::arg("hi"),
        py::arg("residual"), py::arg("input_multiplier"), py::arg("input_bias"), py::arg("input_lo"),
        py::arg("input_hi"), py::arg("output"), py::arg("pool_window") = std::vector<int>(),
        py::arg("packed") = py::none(), py::arg("pack_multiplier") = py::array_t<float>(0),
        py::arg("pack_bias") = py::array_t<float>(0), py::arg("requantize") = py::none(), py::arg("input_requantize") = py::list(),
        py::arg("residual_requantize") = py::none());
#endif
#if HAVE_INT8  // int8 float convolutions: VNNI's form (int8_feature) and, on AVX2 builds, the pairs form
#if HAVE_VNNI
  m.attr("int8_feature") = INT8_FEATURE;
#endif
  m.attr("int8_pairs") = static_cast<bool>(HAVE_INT8_PAIRS);
  m.def("prepare_float_weights_int8", &prepare_float_weights_int8, py::arg("filter"), py::arg("vnni") = py::none());
  // one name for both forms: the weights' dtype (int8 or int16) picks the overload
  auto define_conv2d_int8 = [&m](auto* form) {
    m.def("conv2d_int8", form, py::arg("input"), py::arg("weights"), py::arg("weight_scale"), py::arg("weight_sum"),
          py::arg("bias"), py::arg("geometry"), py::arg("lo"), py::arg("hi"),
          py::arg("residual"), py::arg("input_multiplier"), py::arg("input_bias"), py::arg("input_lo"),
          py::arg("input_hi"), py::arg("output"), py::arg("pool_window") = std::vector<int>(),
          py::arg("input_range") = std::vector<float>(), py::arg("packed") = py::none(),
          py::arg("pack_multiplier") = py::array_t<float>(0), py::arg("pack_bias") = py::array_t<float>(0),
          py::arg("requantize") = py::none(), py::arg("input_requantize") = py::list(),
          py::arg("residual_requantize") = py::none());
  };
  define_conv2d_int8(&conv2d_int8_vnni);
#if HAVE_INT8_PAIRS
  define_conv2d_int8(&conv2d_int8_pairs);
#endif
#endif
  m.def("binary_elementwise", &binary_elementwise);
  m.def("requantize", &requantize);
  m.def("pool2d", &pool2d, py::arg("input"), py::arg("geometry"), py::arg("kind"), py::arg("lo"), py::arg("hi"),
        py::arg("output"), py::arg("packed") = py::none(), py::arg("pack_multiplier") = py::array_t<float>(0),
        py::arg("pack_bias") = py::array_t<float>(0));
  m.def("depthwise_conv2d", &depthwise_conv2d, py::arg("input"), py::arg("filters"), py::arg("bias"),
        py::arg("geometry"), py::arg("lo"), py::arg("hi"), py::arg("output"));
  m.def("concat_channels", &concat_channels);
  m.def("resize_bilinear", &resize_bilinear, py::arg("input"), py::arg("top"), py::arg("bottom"), py::arg("down"),
        py::arg("left"), py::arg("right"), py::arg("across"), py::arg("output"));
  m.def("resize_nearest", &resize_nearest, py::arg("input"), py::arg("rows"), py::arg("cols"), py::arg("residual"),
        py::arg("lo"), py::arg("hi"), py::arg("output"), py::arg("packed") = py::none(),
        py::arg("pack_multiplier") = py::array_t<float>(0),
        py::arg("pack_bias") = py::array_t<float>(0), py::arg("requantize") = py::none());
  m.def("warp_crops", &warp_crops);
  m.def("heatmap_peaks", &heatmap_peaks);
#if HAVE_AMX  // AMX's tiles for conv2d_int8 (VNNI's form) and conv2d_bf16: the avx512 build on Linux
  m.def("amx", [](const std::string& precision) {
    if (precision != "int8" && precision != "bfloat16")
      throw std::invalid_argument("amx: precision is 'int8' or 'bfloat16', got '" + precision + "'");
    return amx_enabled(precision == "bfloat16");
  });
#endif
  m.def("cpu_supports", [](const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (feature == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
                                    __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    if (feature == "avx512bw") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#if HAVE_BF16
    if (feature == "avx512bf16") return __builtin_cpu_supports("avx512bf16") != 0;
#endif
#if HAVE_VNNI
    if (feature == INT8_FEATURE) return cpu_runs_vnni();
#endif
    if (feature == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                  __builtin_cpu_supports("popcnt");
#endif
    return feature == "portable";
  });
}
