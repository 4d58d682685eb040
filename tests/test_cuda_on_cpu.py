"""The CPU build of CUDA kernels that the GPU tests use where there is no GPU (cuda_on_cpu.py): it
must compute what a GPU computes and show the bugs a GPU would hide or crash on, each checked on a
small kernel written for it."""
import numpy as np
import pytest

import cuda_on_cpu

pytestmark = pytest.mark.skipif(not cuda_on_cpu.available(), reason="no g++ to build CUDA for the CPU")

SOURCE = r"""
typedef unsigned int u32;

// out[i] = x[i + 1] (the last reads x[n]), neighbours through shared memory, with and without the barrier
extern "C" __global__ void shift_left(const float* x, int n, int barrier, int read_past_end, float* out) {
  __shared__ float tile[256];
  const int i = threadIdx.x;
  tile[i] = i < n ? x[i] : 0.0f;
  if (barrier) __syncthreads();
  if (i + 1 < n) out[i] = tile[i + 1];
  if (read_past_end && i + 1 == n) out[i] = x[n];
}

// ballot of x[i] < 0 per warp, and each lane's neighbour's value by xor-shuffle
extern "C" __global__ void vote(const float* x, int* ballots, int* swapped) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const u32 word = __ballot_sync(0xffffffffu, x[i] < 0.0f);
  if ((threadIdx.x & 31) == 0) ballots[i / 32] = (int)word;
  swapped[i] = __shfl_xor_sync(0xffffffffu, i, 1);
}

// each block rotates its slice of x by one through shared memory; thread 0 of block `skip_block`
// returns after the barrier without writing
extern "C" __global__ void rotate_in_blocks(const float* x, int skip_block, float* out) {
  __shared__ float tile[256];
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  tile[t] = x[i];
  __syncthreads();
  if ((int)blockIdx.x == skip_block && t == 0) return;
  out[i] = tile[(t + 1) % blockDim.x];
}

// lane 0 waits at the block's barrier while the other lanes wait for it at a warp vote
extern "C" __global__ void deadlock(int* out) {
  if (threadIdx.x == 0)
    __syncthreads();
  else
    out[threadIdx.x] = (int)__ballot_sync(0xffffffffu, 1);
}

// a warp operation after some lanes have returned
extern "C" __global__ void vote_after_return(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = (int)__ballot_sync(0xffffffffu, 1);
}

// a 16-byte store at out + offset floats
extern "C" __global__ void store4(int offset, float* out) {
  cuda_on_cpu_check_aligned(out + offset, 16, "float4 store");
  *reinterpret_cast<float4*>(out + offset) = make_float4(1.0f, 2.0f, 3.0f, 4.0f);
}

// one m16n8k256 AND-popcount MMA: lane L's registers from a[L][4] and b[L][2], its results to d[L][4]
extern "C" __global__ void mma(const u32* a, const u32* b, int* d) {
  const int lane = threadIdx.x;
  int c[4] = {1, 2, 3, 4};
  cuda_on_cpu_mma_m16n8k256_and_popc(c, a + 4 * lane, b[2 * lane], b[2 * lane + 1]);
  for (int r = 0; r < 4; ++r) d[4 * lane + r] = c[r];
}
"""


@pytest.fixture(scope="module")
def kernels():
    return cuda_on_cpu.kernels(SOURCE)


def test_a_missing_barrier_gives_a_wrong_result(kernels):
    """With ``__syncthreads`` the shift is right in both thread orders; without it a thread reads
    its neighbour's slot before the neighbour wrote it (poisoned shared memory), in one of them."""
    x = np.arange(1, 201, dtype=np.float32)
    for _ in range(2):  # launches alternate the thread order
        out = np.zeros(200, np.float32)
        kernels.launch("shift_left", (1,), (256,), (x, np.int32(200), np.int32(1), np.int32(0), out))
        np.testing.assert_array_equal(out[:199], x[1:])
    wrong = 0
    for _ in range(2):
        out = np.zeros(200, np.float32)
        kernels.launch("shift_left", (1,), (256,), (x, np.int32(200), np.int32(0), np.int32(0), out))
        wrong += int(np.sum(out[:199] != x[1:]))
    assert wrong >= 199


def test_every_block_runs_every_thread_from_the_start(kernels):
    """Threads run the kernel block after block (the emulation starts them once a launch): each
    block's barrier and shared memory are its own, and a thread that returned early in one block
    runs whole in the next; in both thread orders."""
    x = np.arange(1, 5 * 64 + 1, dtype=np.float32)
    expected = np.roll(x.reshape(5, 64), -1, axis=1).reshape(-1)
    for skip_block in (1, 1):  # launches alternate the thread order
        out = np.zeros_like(x)
        kernels.launch("rotate_in_blocks", (5,), (64,), (x, np.int32(skip_block), out))
        assert out[64] == 0
        out[64] = expected[64]
        np.testing.assert_array_equal(out, expected)


def test_threads_that_wait_for_each_other_are_an_error(kernels):
    for _ in range(2):
        with pytest.raises(AssertionError, match=r"deadlock: every live thread waits at a barrier \(block 0\)"):
            kernels.launch("deadlock", (1,), (64,), (np.zeros(64, np.int32),))
    x, out = np.arange(200, dtype=np.float32), np.zeros(200, np.float32)
    kernels.launch("shift_left", (1,), (256,), (x, np.int32(200), np.int32(1), np.int32(0), out))  # still usable
    np.testing.assert_array_equal(out[:199], x[1:])


def test_a_read_past_an_arrays_end_is_an_error_naming_the_thread(kernels):
    x, out = np.arange(200, dtype=np.float32), np.zeros(200, np.float32)
    with pytest.raises(AssertionError, match=r"shift_left \(on the CPU\): memory fault .* block \(0,0,0\) thread 199"):
        kernels.launch("shift_left", (1,), (256,), (x, np.int32(200), np.int32(1), np.int32(1), out))
    kernels.launch("shift_left", (1,), (256,), (x, np.int32(200), np.int32(1), np.int32(0), out))  # still usable
    np.testing.assert_array_equal(out[:199], x[1:])


def test_a_misaligned_vector_store_is_an_error(kernels):
    out = np.zeros(8, np.float32)
    kernels.launch("store4", (1,), (32,), (np.int32(4), out))
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 1, 2, 3, 4])
    with pytest.raises(AssertionError, match=r"float4 store at an address not aligned to 16 bytes \(block \(0,0,0\) thread \d+\)"):
        kernels.launch("store4", (1,), (32,), (np.int32(2), out))


def test_warp_votes_and_shuffles(kernels):
    x = np.random.default_rng(0).normal(size=128).astype(np.float32)
    ballots, swapped = np.zeros(4, np.int32), np.zeros(128, np.int32)
    kernels.launch("vote", (2,), (64,), (x, ballots, swapped))
    expected = [sum(1 << lane for lane in range(32) if x[32 * w + lane] < 0) for w in range(4)]
    np.testing.assert_array_equal(ballots.view(np.uint32), np.array(expected, np.uint32))
    np.testing.assert_array_equal(swapped, np.arange(128) ^ 1)
    with pytest.raises(AssertionError, match="__ballot_sync in a warp with exited lanes"):
        kernels.launch("vote_after_return", (1,), (32,), (np.zeros(32, np.int32),))


def test_mma_is_the_documented_fragment_product():
    """D = C + popc(A & B) over 256 bits, with A (16 x 256) and B (256 x 8) scattered into the
    lanes' registers as the PTX ISA lays out m16n8k256 .b1 fragments (this scatter written from
    the ISA's tables, independently of the emulation's gather)."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**32, (16, 8), dtype=np.uint64).astype(np.uint32)  # [row, 32-bit word of K]
    b = rng.integers(0, 2**32, (8, 8), dtype=np.uint64).astype(np.uint32)  # [column, word]
    a_regs, b_regs = np.zeros((32, 4), np.uint32), np.zeros((32, 2), np.uint32)
    for lane in range(32):
        group, t = divmod(lane, 4)  # groupID = lane >> 2, threadID_in_group = lane % 4
        a_regs[lane] = a[group, t], a[group + 8, t], a[group, t + 4], a[group + 8, t + 4]
        b_regs[lane] = b[group, t], b[group, t + 4]
    d = np.zeros((32, 4), np.int32)
    cuda_on_cpu.kernels(SOURCE).launch("mma", (1,), (32,), (a_regs, b_regs, d))
    product = np.array([[sum(bin(int(a[r, w]) & int(b[c, w])).count("1") for w in range(8)) for c in range(8)]
                        for r in range(16)])
    for lane in range(32):
        group, t = divmod(lane, 4)
        assert list(d[lane]) == [1 + product[group, 2 * t], 2 + product[group, 2 * t + 1],
                                 3 + product[group + 8, 2 * t], 4 + product[group + 8, 2 * t + 1]]


def test_source_that_does_not_compile_is_an_error_with_the_compilers_message():
    with pytest.raises(AssertionError, match="(?s)does not compile for the CPU emulation.*undeclared_name"):
        cuda_on_cpu.kernels('extern "C" __global__ void broken(int* out) { out[0] = undeclared_name; }')
