// Kernels of larq_landmarks.runtime: bit-packing, binary convolution with LCE's output transform
// fused, float convolution, and the element-wise ops of the named models.
//
// One source, built three times by setup.py with different instruction sets (RUNTIME_MODULE names
// the Python module): _kernels_avx512 (AVX-512 with VPOPCNTDQ), _kernels_avx2 (AVX2 + FMA), and
// _kernels_portable (baseline C++). Python picks one at run time from the CPU's features.
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
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace py = pybind11;

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
static const char* kPath = "avx512";
constexpr int kFloatLanes = 16;
#elif defined(__AVX2__)
static const char* kPath = "avx2";
constexpr int kFloatLanes = 8;
#else
static const char* kPath = "portable";
constexpr int kFloatLanes = 4;
#endif

typedef float vfloat __attribute__((vector_size(kFloatLanes * 4)));

// ---------------------------------------------------------------------------------------------
// A small persistent thread pool: parallel_for(n, fn) runs fn(begin, end) over [0, n) in chunks.
// Workers spin for a while (about a millisecond) before sleeping: a model's ops follow each other
// within microseconds, and waking a sleeping thread costs more than most ops take.
class ThreadPool {
 public:
  ~ThreadPool() { resize(1); }

  void resize(int threads) {
    if (threads < 1) threads = 1;
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

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void parallel_for(int n, const std::function<void(int, int)>& fn) {
    const int threads = std::min(size(), n);
    if (threads <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    task_ = &fn;
    total_ = n;
    active_ = threads;
    pending_.store(threads - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    run_share(0, threads);
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

  void run_share(int index, int threads) {
    const int begin = static_cast<int>(static_cast<int64_t>(total_) * index / threads);
    const int end = static_cast<int>(static_cast<int64_t>(total_) * (index + 1) / threads);
    if (end > begin) (*task_)(begin, end);
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
        run_share(index, active_);
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void(int, int)>* task_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  int total_ = 0, active_ = 0;
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

// ---------------------------------------------------------------------------------------------
// Bit-packing: bit = (x * multiplier[c] + bias[c] < 0), each part optional (LceQuantize, with the
// per-channel MUL and ADD of a preceding batch norm fused in). The product and the sum are rounded
// separately, as the unfused ops round them (no FMA contraction here).
__attribute__((optimize("fp-contract=off")))
static void bitpack(Array<float> input, Array<float> multiplier, Array<float> bias, Array<int32_t> output) {
  const int channels = static_cast<int>(input.shape(input.ndim() - 1));
  const int words = (channels + 31) / 32;
  const int64_t pixels = input.size() / std::max(channels, 1);
  if (output.size() != pixels * words) throw std::invalid_argument("bitpack: output has the wrong size");
  const bool scaled = multiplier.size() > 0, biased = bias.size() > 0;
  if ((scaled && multiplier.size() != channels) || (biased && bias.size() != channels))
    throw std::invalid_argument("bitpack: multiplier or bias size");
  const float* x = input.data();
  const float* m = multiplier.data();
  const float* b = bias.data();
  int32_t* out = data(output);
  py::gil_scoped_release release;
  const int chunks = static_cast<int>(std::min<int64_t>(pixels, 256));
  pool().parallel_for(chunks, [&](int begin, int end) {
    const int64_t p0 = pixels * begin / chunks, p1 = pixels * end / chunks;
    for (int64_t p = p0; p < p1; ++p) {
      const float* row = x + p * channels;
      int32_t* packed = out + p * words;
      for (int w = 0; w < words; ++w) {
        const int c0 = 32 * w, n = std::min(32, channels - c0);
        uint32_t bits = 0;
#if defined(__AVX512F__)
        if (n == 32) {
          __m512 lo = _mm512_loadu_ps(row + c0), hi = _mm512_loadu_ps(row + c0 + 16);
          if (scaled) {
            lo = _mm512_mul_ps(lo, _mm512_loadu_ps(m + c0));
            hi = _mm512_mul_ps(hi, _mm512_loadu_ps(m + c0 + 16));
          }
          if (biased) {
            lo = _mm512_add_ps(lo, _mm512_loadu_ps(b + c0));
            hi = _mm512_add_ps(hi, _mm512_loadu_ps(b + c0 + 16));
          }
          const __m512 zero = _mm512_setzero_ps();
          bits = static_cast<uint32_t>(_mm512_cmp_ps_mask(lo, zero, _CMP_LT_OQ)) |
                 (static_cast<uint32_t>(_mm512_cmp_ps_mask(hi, zero, _CMP_LT_OQ)) << 16);
          packed[w] = static_cast<int32_t>(bits);
          continue;
        }
#endif
        for (int i = 0; i < n; ++i) {
          float v = row[c0 + i];
          if (scaled) v = v * m[c0 + i];
          if (biased) v = v + b[c0 + i];
          bits |= static_cast<uint32_t>(v < 0.0f) << i;
        }
        packed[w] = static_cast<int32_t>(bits);
      }
    }
  });
}

// LceDequantize: bits -> +1 / -1.
static void unpack(Array<int32_t> input, int channels, Array<float> output) {
  const int words = static_cast<int>(input.shape(input.ndim() - 1));
  const int64_t pixels = input.size() / std::max(words, 1);
  const int32_t* in = input.data();
  float* out = data(output);
  py::gil_scoped_release release;
  for (int64_t p = 0; p < pixels; ++p)
    for (int c = 0; c < channels; ++c)
      out[p * channels + c] = ((static_cast<uint32_t>(in[p * words + c / 32]) >> (c % 32)) & 1u) ? -1.0f : 1.0f;
}

// ---------------------------------------------------------------------------------------------
// Binary convolution. Weights are prepared once (prepare_binary_weights) as [taps * words_in,
// channels_padded]: for each input word, the words of 64 consecutive output channels side by side,
// so one input word is broadcast against 16 output channels per AVX-512 register.
constexpr int kBinaryChannelBlock = 64;  // output channels per register tile
constexpr int kBinaryPixelBlock = 4;     // output pixels per register tile

static Array<int32_t> prepare_binary_weights(Array<int32_t> filter) {
  // filter: [Cout, fh, fw, words_in] (LCE's layout) -> [fh * fw * words_in, Cout rounded up to 64]
  const int cout = static_cast<int>(filter.shape(0));
  const int k = static_cast<int>(filter.size() / cout);
  const int padded = (cout + kBinaryChannelBlock - 1) / kBinaryChannelBlock * kBinaryChannelBlock;
  Array<int32_t> out({k, padded});
  int32_t* o = data(out);
  std::memset(o, 0, sizeof(int32_t) * k * padded);
  const int32_t* f = filter.data();
  for (int c = 0; c < cout; ++c)
    for (int i = 0; i < k; ++i) o[static_cast<int64_t>(i) * padded + c] = f[static_cast<int64_t>(c) * k + i];
  return out;
}

static inline uint32_t popcount32(uint32_t x) { return static_cast<uint32_t>(__builtin_popcount(x)); }

// acc[p][c] += popcount(in_p[w] ^ weights[k][c]) over k = (tap, w), for 4 pixels x 16 * NV
// channels (NV = 4, or 2 for a last block of at most 32 channels).
template <int NV>
static inline void binary_tile(const int32_t* const* taps_in, int taps, int words, const int32_t* weights,
                               int64_t stride, int32_t acc[kBinaryPixelBlock][kBinaryChannelBlock]) {
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
  __m512i a[kBinaryPixelBlock][NV];
  for (int p = 0; p < kBinaryPixelBlock; ++p)
    for (int j = 0; j < NV; ++j) a[p][j] = _mm512_setzero_si512();
  for (int t = 0; t < taps; ++t) {
    const int32_t* const* in = taps_in + t * kBinaryPixelBlock;
    const int32_t* w_row = weights + static_cast<int64_t>(t) * words * stride;
    for (int w = 0; w < words; ++w, w_row += stride) {
      __m512i wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(w_row + 16 * j);
      for (int p = 0; p < kBinaryPixelBlock; ++p) {
        const __m512i x = _mm512_set1_epi32(in[p][w]);
        for (int j = 0; j < NV; ++j) a[p][j] = _mm512_add_epi32(a[p][j], _mm512_popcnt_epi32(_mm512_xor_si512(x, wv[j])));
      }
    }
  }
  for (int p = 0; p < kBinaryPixelBlock; ++p)
    for (int j = 0; j < NV; ++j) _mm512_storeu_si512(acc[p] + 16 * j, a[p][j]);
#elif defined(__AVX2__)
  // No vector popcount: nibble look-up (vpshufb), byte counts summed in 8-bit lanes for up to 31
  // words, then widened to the 32-bit accumulators with vpmaddubsw / vpmaddwd.
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3,
                                       1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f), ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int p = 0; p < kBinaryPixelBlock; ++p) std::memset(acc[p], 0, sizeof(acc[p]));
  for (int half = 0; half < NV / 2; ++half) {  // 32 channels (4 registers) per pass keeps 16 accumulators
    __m256i a[kBinaryPixelBlock][4], bytes[kBinaryPixelBlock][4];
    for (int p = 0; p < kBinaryPixelBlock; ++p)
      for (int j = 0; j < 4; ++j) a[p][j] = bytes[p][j] = _mm256_setzero_si256();
    int pending = 0;
    auto flush = [&] {
      for (int p = 0; p < kBinaryPixelBlock; ++p)
        for (int j = 0; j < 4; ++j) {
          const __m256i pairs = _mm256_maddubs_epi16(bytes[p][j], ones8);
          a[p][j] = _mm256_add_epi32(a[p][j], _mm256_madd_epi16(pairs, ones16));
          bytes[p][j] = _mm256_setzero_si256();
        }
      pending = 0;
    };
    for (int t = 0; t < taps; ++t) {
      const int32_t* const* in = taps_in + t * kBinaryPixelBlock;
      const int32_t* w_row = weights + static_cast<int64_t>(t) * words * stride + 32 * half;
      for (int w = 0; w < words; ++w, w_row += stride) {
        __m256i wv[4];
        for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_row + 8 * j));
        for (int p = 0; p < kBinaryPixelBlock; ++p) {
          const __m256i x = _mm256_set1_epi32(in[p][w]);
          for (int j = 0; j < 4; ++j) {
            const __m256i v = _mm256_xor_si256(x, wv[j]);
            const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
            const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
            bytes[p][j] = _mm256_add_epi8(bytes[p][j], _mm256_add_epi8(lo, hi));
          }
        }
        if (++pending == 31) flush();  // a byte lane holds at most 31 * 8 = 248
      }
    }
    flush();
    for (int p = 0; p < kBinaryPixelBlock; ++p)
      for (int j = 0; j < 4; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc[p] + 32 * half + 8 * j), a[p][j]);
  }
#else
  for (int p = 0; p < kBinaryPixelBlock; ++p) std::memset(acc[p], 0, sizeof(acc[p]));
  for (int t = 0; t < taps; ++t) {
    const int32_t* const* in = taps_in + t * kBinaryPixelBlock;
    const int32_t* w_row = weights + static_cast<int64_t>(t) * words * stride;
    for (int w = 0; w < words; ++w, w_row += stride)
      for (int p = 0; p < kBinaryPixelBlock; ++p) {
        const uint32_t x = static_cast<uint32_t>(in[p][w]);
        for (int c = 0; c < 16 * NV; ++c) acc[p][c] += popcount32(x ^ static_cast<uint32_t>(w_row[c]));
      }
  }
#endif
}

struct BinaryConv {
  int channels_in, channels_out, filter_h, filter_w, stride_h, stride_w, dilation_h, dilation_w;
  int pad_top, pad_left, pad_value;  // pad_value 1: pad with +1 (zero bits); 0: pad with 0
};

// out (float): float(clamp(2 * acc, clamp_min, clamp_max)) * multiplier[c] + bias[c]   (LCE's form)
// out (bit-packed, thresholds given): bit = acc > thresholds[c]
static void bconv2d(Array<int32_t> input, Array<int32_t> weights, std::vector<int> geometry,
                    Array<float> multiplier, Array<float> bias, int clamp_min, int clamp_max,
                    Array<int32_t> thresholds, Array<int32_t> weight_popcounts, py::array output) {
  if (geometry.size() != 11) throw std::invalid_argument("bconv2d: geometry needs 11 numbers");
  const BinaryConv g{geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5],
                     geometry[6], geometry[7], geometry[8], geometry[9], geometry[10]};
  const int batch = static_cast<int>(input.shape(0)), height = static_cast<int>(input.shape(1));
  const int width = static_cast<int>(input.shape(2)), words = static_cast<int>(input.shape(3));
  const int out_h = static_cast<int>(output.shape(1)), out_w = static_cast<int>(output.shape(2));
  const int taps = g.filter_h * g.filter_w;
  const int64_t stride = weights.shape(1);
  if (weights.shape(0) != static_cast<int64_t>(taps) * words) throw std::invalid_argument("bconv2d: weights shape");
  const bool packed_output = thresholds.size() > 0;
  const int out_words = (g.channels_out + 31) / 32;
  const int out_channels_stored = packed_output ? out_words : g.channels_out;
  if (output.shape(3) != out_channels_stored) throw std::invalid_argument("bconv2d: output channels");
  const int32_t* in = input.data();
  const int32_t* wt = weights.data();
  const float* mul = multiplier.data();
  const float* add = bias.data();
  const int32_t* thr = thresholds.data();
  const int32_t* wpop = weight_popcounts.data();  // [taps, Cout]: set bits of each tap's weights
  float* out_f = packed_output ? nullptr : static_cast<float*>(output.mutable_data());
  int32_t* out_b = packed_output ? static_cast<int32_t*>(output.mutable_data()) : nullptr;
  const int64_t pixels = static_cast<int64_t>(batch) * out_h * out_w;
  const int tiles = static_cast<int>((pixels + kBinaryPixelBlock - 1) / kBinaryPixelBlock);
  const int cblocks = static_cast<int>(stride / kBinaryChannelBlock);
  std::vector<int32_t> zeros(words + 16, 0);
  const bool zero_padding = g.pad_value == 0;
  const int half_in = g.channels_in / 2;
  py::gil_scoped_release release;

  pool().parallel_for(tiles, [&](int tile_begin, int tile_end) {
    std::vector<const int32_t*> taps_in(static_cast<size_t>(taps) * kBinaryPixelBlock);
    std::vector<int> outside(static_cast<size_t>(taps) * kBinaryPixelBlock);
    alignas(64) int32_t acc[kBinaryPixelBlock][kBinaryChannelBlock];
    std::vector<uint32_t> packed_bits(static_cast<size_t>(kBinaryPixelBlock) * out_words);
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t first = static_cast<int64_t>(tile) * kBinaryPixelBlock;
      const int count = static_cast<int>(std::min<int64_t>(kBinaryPixelBlock, pixels - first));
      bool any_outside = false;
      // coordinates of the tile's first pixel by division, the next ones by stepping
      int b = static_cast<int>(first / (static_cast<int64_t>(out_h) * out_w));
      int oy = static_cast<int>(first / out_w % out_h), ox = static_cast<int>(first % out_w);
      for (int p = 0; p < kBinaryPixelBlock; ++p) {
        if (p > 0 && p < count && ++ox == out_w) {
          ox = 0;
          if (++oy == out_h) oy = 0, ++b;
        }
        for (int fy = 0; fy < g.filter_h; ++fy)
          for (int fx = 0; fx < g.filter_w; ++fx) {
            const int y = oy * g.stride_h - g.pad_top + fy * g.dilation_h;
            const int x = ox * g.stride_w - g.pad_left + fx * g.dilation_w;
            const int t = fy * g.filter_w + fx;
            const bool inside = y >= 0 && y < height && x >= 0 && x < width;
            taps_in[t * kBinaryPixelBlock + p] =
                inside ? in + ((static_cast<int64_t>(b) * height + y) * width + x) * words : zeros.data();
            outside[t * kBinaryPixelBlock + p] = !inside;
            any_outside |= !inside;
          }
      }
      std::fill(packed_bits.begin(), packed_bits.end(), 0u);
      for (int cb = 0; cb < cblocks; ++cb) {
        const int c0 = cb * kBinaryChannelBlock;
        const int c_end = std::min(g.channels_out, c0 + kBinaryChannelBlock);
        if (c_end - c0 <= 32)
          binary_tile<2>(taps_in.data(), taps, words, wt + c0, stride, acc);
        else
          binary_tile<4>(taps_in.data(), taps, words, wt + c0, stride, acc);
        for (int p = 0; p < count; ++p) {
          if (zero_padding && any_outside) {
            // LCE's reference: an outside tap adds channels_in / 2 (contributes 0), where the
            // kernel above counted the weights' set bits (a +1 input).
            for (int t = 0; t < taps; ++t)
              if (outside[t * kBinaryPixelBlock + p])
                for (int c = c0; c < c_end; ++c) acc[p][c - c0] += half_in - wpop[static_cast<int64_t>(t) * g.channels_out + c];
          }
          const int64_t pixel = first + p;
#if defined(__AVX512F__)
          // the output transform on 16 channels at a time (c0 is a multiple of 64)
          for (int c = c0; c < c_end; c += 16) {
            const int left = std::min(16, c_end - c);
            const __mmask16 mk = static_cast<__mmask16>((1u << left) - 1u);
            const __m512i a = _mm512_loadu_si512(acc[p] + (c - c0));
            if (packed_output) {
              const uint32_t bits = _mm512_mask_cmpgt_epi32_mask(mk, a, _mm512_maskz_loadu_epi32(mk, thr + c));
              packed_bits[p * out_words + c / 32] |= bits << (c % 32);
            } else {
              __m512i v = _mm512_min_epi32(_mm512_max_epi32(_mm512_slli_epi32(a, 1), _mm512_set1_epi32(clamp_min)),
                                           _mm512_set1_epi32(clamp_max));
              const __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_maskz_loadu_ps(mk, mul + c),
                                               _mm512_maskz_loadu_ps(mk, add + c));
              _mm512_mask_storeu_ps(out_f + pixel * g.channels_out + c, mk, y);
            }
          }
#else
          if (packed_output) {
            uint32_t* bits = packed_bits.data() + p * out_words;
            for (int c = c0; c < c_end; ++c) bits[c / 32] |= static_cast<uint32_t>(acc[p][c - c0] > thr[c]) << (c % 32);
          } else {
            float* o = out_f + pixel * g.channels_out;
            for (int c = c0; c < c_end; ++c) {
              const int32_t v = std::min(std::max(acc[p][c - c0] * 2, clamp_min), clamp_max);
              o[c] = static_cast<float>(v) * mul[c] + add[c];
            }
          }
#endif
        }
      }
      if (packed_output)
        for (int p = 0; p < count; ++p)
          std::memcpy(out_b + (first + p) * out_words, packed_bits.data() + p * out_words, sizeof(int32_t) * out_words);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Float convolution: im2col (only when the filter is not 1x1 stride 1) and a register-tiled GEMM
// C[P, Cout] = A[P, K] B[K, Cout] + bias with the fused activation clamp. B is prepared once as
// [K, Cout rounded up to kFloatTileN].
#if defined(__AVX512F__)
constexpr int kFloatTileM = 6;
#else
constexpr int kFloatTileM = 4;
#endif
constexpr int kFloatVectors = (kFloatLanes == 16) ? 4 : 2;
constexpr int kFloatTileN = kFloatLanes * kFloatVectors;

static Array<float> prepare_float_weights(Array<float> filter) {
  // filter: [Cout, fh, fw, Cin] (TFLite) -> [fh * fw * Cin, Cout rounded up]
  const int cout = static_cast<int>(filter.shape(0));
  const int k = static_cast<int>(filter.size() / cout);
  const int padded = (cout + kFloatTileN - 1) / kFloatTileN * kFloatTileN;
  Array<float> out({k, padded});
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

// out[r, c] = clamp(sum_k a[r, k] b[k, c] + bias[c] (+ residual[r, c]), lo, hi)
static void gemm_rows(const float* a, int64_t rows, int k, const float* b, int64_t ldb, int cout,
                      const float* bias, const float* residual, float lo, float hi, float* c) {
  const int nblocks = static_cast<int>(ldb / kFloatTileN);
  for (int64_t r0 = 0; r0 < rows; r0 += kFloatTileM) {
    const int m = static_cast<int>(std::min<int64_t>(kFloatTileM, rows - r0));
    const float* arow[kFloatTileM];
    for (int i = 0; i < kFloatTileM; ++i) arow[i] = a + (r0 + std::min(i, m - 1)) * k;
    for (int nb = 0; nb < nblocks; ++nb) {
      const float* bp = b + nb * kFloatTileN;
      const int c0 = nb * kFloatTileN, n = std::min(kFloatTileN, cout - c0);
#if defined(__AVX512F__)
      // 6 x 64 tile in 24 named registers (an array of vectors made GCC spill to the stack); the
      // epilogue (bias, residual, clamp) runs on the registers with masked loads and stores.
#define ROW(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
      ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
      for (int kk = 0; kk < k; ++kk, bp += ldb) {
        const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
        const __m512 b2 = _mm512_loadu_ps(bp + 32), b3 = _mm512_loadu_ps(bp + 48);
#define ROW(i)                                          \
  {                                                     \
    const __m512 a = _mm512_set1_ps(arow[i][kk]);       \
    c##i##0 = _mm512_fmadd_ps(a, b0, c##i##0);          \
    c##i##1 = _mm512_fmadd_ps(a, b1, c##i##1);          \
    c##i##2 = _mm512_fmadd_ps(a, b2, c##i##2);          \
    c##i##3 = _mm512_fmadd_ps(a, b3, c##i##3);          \
  }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
      }
      __mmask16 mask[4];
      __m512 bias_v[4];
      for (int j = 0; j < 4; ++j) {
        const int left = std::max(0, std::min(16, n - 16 * j));
        mask[j] = static_cast<__mmask16>((1u << left) - 1u);
        bias_v[j] = _mm512_maskz_loadu_ps(mask[j], bias + c0 + 16 * j);
      }
      const __m512 lo_v = _mm512_set1_ps(lo), hi_v = _mm512_set1_ps(hi);
      auto finish = [&](int i, int j, __m512 v) {
        v = _mm512_add_ps(v, bias_v[j]);
        const int64_t at = (r0 + i) * cout + c0 + 16 * j;
        if (residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[j], residual + at));
        _mm512_mask_storeu_ps(c + at, mask[j], _mm512_min_ps(_mm512_max_ps(v, lo_v), hi_v));
      };
#define ROW(i)                  \
  if (i < m) {                  \
    finish(i, 0, c##i##0);      \
    finish(i, 1, c##i##1);      \
    finish(i, 2, c##i##2);      \
    finish(i, 3, c##i##3);      \
  }
      ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
#else
      alignas(64) float tmp[kFloatTileM][kFloatTileN];
      vfloat acc[kFloatTileM][kFloatVectors] = {};
      for (int kk = 0; kk < k; ++kk, bp += ldb) {
        vfloat bv[kFloatVectors];
        for (int j = 0; j < kFloatVectors; ++j) bv[j] = load_v(bp + j * kFloatLanes);
        for (int i = 0; i < kFloatTileM; ++i) {
          const float av = arow[i][kk];  // broadcast by the vector-scalar product
          for (int j = 0; j < kFloatVectors; ++j) acc[i][j] += av * bv[j];
        }
      }
      for (int i = 0; i < kFloatTileM; ++i)
        for (int j = 0; j < kFloatVectors; ++j) store_v(tmp[i] + j * kFloatLanes, acc[i][j]);
      for (int i = 0; i < m; ++i) {
        float* out = c + (r0 + i) * cout + c0;
        const float* r = residual ? residual + (r0 + i) * cout + c0 : nullptr;
        for (int q = 0; q < n; ++q) {
          float v = tmp[i][q] + bias[c0 + q];
          if (r) v = v + r[q];
          out[q] = std::min(std::max(v, lo), hi);
        }
      }
#endif
    }
  }
}

static void conv2d(Array<float> input, Array<float> weights, Array<float> bias, std::vector<int> geometry,
                   float lo, float hi, Array<float> residual, Array<float> output) {
  // geometry: filter_h, filter_w, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left
  const int fh = geometry[0], fw = geometry[1], sh = geometry[2], sw = geometry[3];
  const int dh = geometry[4], dw = geometry[5], pt = geometry[6], pl = geometry[7];
  const int batch = static_cast<int>(input.shape(0)), height = static_cast<int>(input.shape(1));
  const int width = static_cast<int>(input.shape(2)), cin = static_cast<int>(input.shape(3));
  const int out_h = static_cast<int>(output.shape(1)), out_w = static_cast<int>(output.shape(2));
  const int cout = static_cast<int>(output.shape(3));
  const int k = fh * fw * cin;
  if (weights.shape(0) != k) throw std::invalid_argument("conv2d: weights shape");
  const int64_t ldb = weights.shape(1);
  const float* x = input.data();
  const float* b = weights.data();
  const float* bs = bias.data();
  float* y = data(output);
  const int64_t pixels = static_cast<int64_t>(batch) * out_h * out_w;
  if (residual.size() > 0 && residual.size() != output.size()) throw std::invalid_argument("conv2d: residual shape");
  const float* res = residual.size() > 0 ? residual.data() : nullptr;
  const bool direct = fh == 1 && fw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0;
  py::gil_scoped_release release;
  constexpr int kRowsPerTask = 96;  // a multiple of every path's row tile
  const int tasks = static_cast<int>((pixels + kRowsPerTask - 1) / kRowsPerTask);
  pool().parallel_for(tasks, [&](int t0, int t1) {
    std::vector<float> patch(direct ? 0 : static_cast<size_t>(kRowsPerTask) * k);
    for (int t = t0; t < t1; ++t) {
      const int64_t r0 = static_cast<int64_t>(t) * kRowsPerTask;
      const int64_t rows = std::min<int64_t>(kRowsPerTask, pixels - r0);
      const float* a = x + r0 * cin;
      if (!direct) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t pixel = r0 + r;
          const int bi = static_cast<int>(pixel / (out_h * out_w));
          const int oy = static_cast<int>(pixel / out_w % out_h), ox = static_cast<int>(pixel % out_w);
          float* dst = patch.data() + r * k;
          for (int fy = 0; fy < fh; ++fy) {
            const int iy = oy * sh - pt + fy * dh, ix0 = ox * sw - pl;
            const float* src_row = x + (static_cast<int64_t>(bi) * height + iy) * width * cin;
            if (dw == 1 && iy >= 0 && iy < height && ix0 >= 0 && ix0 + fw <= width) {
              std::memcpy(dst, src_row + static_cast<int64_t>(ix0) * cin, sizeof(float) * fw * cin);  // one run of taps
              dst += fw * cin;
              continue;
            }
            for (int fx = 0; fx < fw; ++fx, dst += cin) {
              const int ix = ix0 + fx * dw;
              if (iy < 0 || iy >= height || ix < 0 || ix >= width)
                std::memset(dst, 0, sizeof(float) * cin);
              else
                std::memcpy(dst, src_row + static_cast<int64_t>(ix) * cin, sizeof(float) * cin);
            }
          }
        }
        a = patch.data();
      }
      gemm_rows(a, rows, k, b, ldb, cout, bs, res ? res + r0 * cout : nullptr, lo, hi, y + r0 * cout);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Element-wise: out = clamp(a (op) b) where b is a full tensor, a per-channel vector or a scalar.
static void binary_elementwise(Array<float> a, Array<float> b, int op, float lo, float hi, Array<float> out) {
  const int64_t n = a.size(), nb = b.size();
  if (out.size() != n || (nb != n && nb != 1 && n % nb != 0)) throw std::invalid_argument("elementwise: shapes");
  const float* x = a.data();
  const float* z = b.data();
  float* o = data(out);
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

// MAX_POOL_2D (kind 0) and AVERAGE_POOL_2D (kind 1, the mean of the taps inside the image, as
// TFLite computes it), with the fused activation clamp.
static void pool2d(Array<float> input, std::vector<int> geometry, int kind, float lo, float hi, Array<float> output) {
  const int fh = geometry[0], fw = geometry[1], sh = geometry[2], sw = geometry[3], pt = geometry[4], pl = geometry[5];
  const int batch = static_cast<int>(input.shape(0)), height = static_cast<int>(input.shape(1));
  const int width = static_cast<int>(input.shape(2)), channels = static_cast<int>(input.shape(3));
  const int out_h = static_cast<int>(output.shape(1)), out_w = static_cast<int>(output.shape(2));
  const float* x = input.data();
  float* y = data(output);
  py::gil_scoped_release release;
  pool().parallel_for(batch * out_h, [&](int r0, int r1) {
    std::vector<float> acc(channels);
    for (int r = r0; r < r1; ++r) {
      const int b = r / out_h, oy = r % out_h;
      for (int ox = 0; ox < out_w; ++ox) {
        std::fill(acc.begin(), acc.end(), kind == 0 ? -std::numeric_limits<float>::infinity() : 0.0f);
        int taps = 0;
        for (int fy = 0; fy < fh; ++fy)
          for (int fx = 0; fx < fw; ++fx) {
            const int iy = oy * sh - pt + fy, ix = ox * sw - pl + fx;
            if (iy < 0 || iy >= height || ix < 0 || ix >= width) continue;
            ++taps;
            const float* src = x + ((static_cast<int64_t>(b) * height + iy) * width + ix) * channels;
            if (kind == 0)
              for (int c = 0; c < channels; ++c) acc[c] = std::max(acc[c], src[c]);
            else
              for (int c = 0; c < channels; ++c) acc[c] += src[c];
          }
        float* dst = y + ((static_cast<int64_t>(b) * out_h + oy) * out_w + ox) * channels;
        const float scale = kind == 0 ? 1.0f : 1.0f / static_cast<float>(std::max(taps, 1));
        for (int c = 0; c < channels; ++c) dst[c] = std::min(std::max(kind == 0 ? acc[c] : acc[c] * scale, lo), hi);
      }
    }
  });
}

// CONCATENATION along the channel axis: each pixel's channels are the parts' channels in order;
// with a residual (same shape as the output), the ADD that follows is done in the same pass.
static void concat_channels(std::vector<Array<float>> parts, Array<float> residual, Array<float> output) {
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
  float* out = data(output);
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
  m.def("bconv2d", &bconv2d);
  m.def("prepare_float_weights", &prepare_float_weights);
  m.def("conv2d", &conv2d);
  m.def("binary_elementwise", &binary_elementwise);
  m.def("pool2d", &pool2d);
  m.def("concat_channels", &concat_channels);
  m.def("cpu_supports", [](const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (feature == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
                                    __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    if (feature == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                  __builtin_cpu_supports("popcnt");
#endif
    return feature == "portable";
  });
}
