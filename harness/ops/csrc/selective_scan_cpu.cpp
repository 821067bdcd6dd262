// Selective scan on CPU with mamba_ssm `selective_scan_fn` semantics: forward and backward,
// float32 and float64.
//
//   delta_t = softplus?(delta[b, c, t] + bias[c])
//   x_t[n]  = exp(delta_t * A[c, n]) * x_{t-1}[n] + delta_t * B[b, grp, n, t] * u[b, c, t]
//   y_t     = sum_n C[b, grp, n, t] * x_t[n] + D[c] * u[b, c, t],   grp = c / (dim / groups)
//
// Layout: u, delta, y and their gradients (batch, dim, L); A (dim, N); B, C and their
// gradients (batch, groups, N, L), all contiguous.
//
// The forward is vectorised across channels: the lanes of a vector are consecutive channels
// of one group (or of two, see FwdBlocks), which share B and C, so B_t[n] and C_t[n] are
// scalar broadcasts and the sum over n needs no horizontal adds.
// The backward is vectorised across n, padded to Np (a whole number of vectors; the padding
// lanes hold A = B = C = 0, which keeps their states and gradients at 0). dB and dC sum over
// a group's channels, so a task owns a (batch, group) and runs its channels one after the
// other: no races. Time runs in chunks of kChunk steps; per chunk, B and C are transposed
// into (kChunk, Np) scratch and dB, dC gathered there and transposed back.
//
// Speed: explicit GCC vector types with a branch-free polynomial exp / log1p; the same
// templates compiled for baseline x86-64, AVX2 + FMA and AVX-512 and picked at run time (so
// no -march=native); chunk buffers that stay in L1; at::parallel_for over independent tasks.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

// Vector types wider than the default target in always-inline helpers trigger ABI notes
// that do not apply (they are never called across an ABI boundary).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

// Timesteps per chunk (a multiple of every vector width). Chunk buffers stay in L1/L2 for
// any L; the backward keeps states only at chunk starts and recomputes one chunk at a time.
constexpr int64_t kChunk = 64;
// Widest vector: 64 bytes of float.
constexpr int64_t kMaxLanes = 16;
// Channels the backward walks through the chunks together (bounds its per-channel
// checkpoints to kPassChannels * L * Np / kChunk values).
constexpr int64_t kPassChannels = 64;

#define EAB_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------
// SIMD vectors of W lanes (GCC vector extension: arithmetic, comparisons and ?: work
// lane-wise and compile to whatever the enclosing function's target supports).
// ---------------------------------------------------------------------------------------

template <typename T>
struct ExpConst;

template <typename T, int W>
struct Vec {
  typedef T v __attribute__((vector_size(sizeof(T) * W)));
  typedef typename ExpConst<T>::Bits vi __attribute__((vector_size(sizeof(T) * W)));

  static EAB_INLINE v load(const T* p) {
    v r;
    std::memcpy(&r, p, sizeof(r));  // unaligned load
    return r;
  }
  static EAB_INLINE void store(T* p, v x) { std::memcpy(p, &x, sizeof(x)); }
  // (For a run-time s this costs a scalar add, but it is the form gcc reliably turns into
  // a broadcast; element-wise construction can come out as one insert per lane.)
  static EAB_INLINE v splat(T s) { return v{} + s; }

  // Horizontal sum by halving (log2(W) shuffle + add steps).
  static EAB_INLINE T sum(v x) {
    if constexpr (W == 2) {
      return x[0] + x[1];
    } else {
      typename Vec<T, W / 2>::v lo, hi;
      std::memcpy(&lo, &x, sizeof(lo));
      std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(lo), sizeof(hi));
      return Vec<T, W / 2>::sum(lo + hi);
    }
  }
};

// A state of Np values, vector j * W .. j * W + W - 1 at offset j * W: NVC > 0 vectors held
// in registers (loops over the offsets have constant trip counts and unroll), or, for
// NVC == 0, the caller's memory.
template <typename T, int W, int NVC>
struct VecState {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  v reg[NVC > 0 ? NVC : 1];
  T* mem;

  EAB_INLINE explicit VecState(T* memory) : mem(memory) {
    if constexpr (NVC > 0) {
      for (int i = 0; i < NVC; ++i) reg[i] = Vt::load(mem + i * W);
    }
  }
  EAB_INLINE v get(int64_t j) const {
    if constexpr (NVC > 0) return reg[j / W];
    return Vt::load(mem + j);
  }
  EAB_INLINE void set(int64_t j, v x) {
    if constexpr (NVC > 0) {
      reg[j / W] = x;
    } else {
      Vt::store(mem + j, x);
    }
  }
  // Write registers back to memory.
  EAB_INLINE void flush() {
    if constexpr (NVC > 0) {
      for (int i = 0; i < NVC; ++i) Vt::store(mem + i * W, reg[i]);
    }
  }
};

// W x W transpose in registers: log2(W) stages, stage S swapping the off-diagonal S x S
// sub-blocks of every 2S x 2S block (each stage is one pair of shuffles per pair of rows).
template <typename V, int W, int S, size_t... I>
EAB_INLINE V swap_lo(V a, V b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, ((I & S) ? W + I - S : I)...);
}

template <typename V, int W, int S, size_t... I>
EAB_INLINE V swap_hi(V a, V b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, ((I & S) ? W + I : I + S)...);
}

template <typename V, int W, int S>
EAB_INLINE void transpose_stages(V* r) {
  if constexpr (S >= 1) {
    for (int i = 0; i < W; ++i) {
      if (i & S) continue;
      const V a = r[i], b = r[i + S];
      r[i] = swap_lo<V, W, S>(a, b, std::make_index_sequence<W>{});
      r[i + S] = swap_hi<V, W, S>(a, b, std::make_index_sequence<W>{});
    }
    transpose_stages<V, W, S / 2>(r);
  }
}

// Lane i of the result = the sum of rows[i]'s lanes: W horizontal sums for about three
// instructions each (the transpose stages, adding the two halves instead of keeping both).
template <typename V, int W, int S>
EAB_INLINE void row_sum_stages(V* r) {
  if constexpr (S >= 1) {
    for (int i = 0; i < S; ++i) {
      r[i] = swap_lo<V, W, S>(r[i], r[i + S], std::make_index_sequence<W>{}) +
             swap_hi<V, W, S>(r[i], r[i + S], std::make_index_sequence<W>{});
    }
    row_sum_stages<V, W, S / 2>(r);
  }
}

// dst[j * ds + i] = src[i * ss + j] (or += if accumulate) for i, j < W; source rows
// i >= rows_in read as 0, destination rows j >= rows_out are not written.
template <typename T, int W>
EAB_INLINE void transpose_block(const T* src, int64_t ss, int64_t rows_in, T* dst, int64_t ds,
                                int64_t rows_out, bool accumulate = false) {
  using Vt = Vec<T, W>;
  typename Vt::v r[W];
  for (int i = 0; i < W; ++i) r[i] = i < rows_in ? Vt::load(src + i * ss) : typename Vt::v{};
  transpose_stages<typename Vt::v, W, W / 2>(r);
  for (int j = 0; j < W && j < rows_out; ++j) {
    Vt::store(dst + j * ds, accumulate ? Vt::load(dst + j * ds) + r[j] : r[j]);
  }
}

// ---------------------------------------------------------------------------------------
// exp, log1p, softplus on vectors: range reduction + polynomial, plain lane-wise arithmetic
// and bit casts (glibc's scalar exp / log1p would serialise the loops).
// ---------------------------------------------------------------------------------------

template <>
struct ExpConst<float> {
  using Bits = uint32_t;
  static constexpr int kMant = 23;
  static constexpr Bits kBias = 127;
  // Adding 1.5 * 2^23 rounds to an integer that ends up in the low mantissa bits.
  static constexpr float kShift = 12582912.0f;
  // Clamp range: exp(kLo) underflows to 0 and exp(kHi) overflows to inf in the final
  // product, while both powers of two it is built from stay normal numbers.
  static constexpr float kLo = -104.0f;
  static constexpr float kHi = 89.0f;
  // Inputs in [-kFast, kFast] need neither clamping nor a split power of two.
  static constexpr float kFast = 87.0f;
  static constexpr float kLog2e = 1.44269504088896341f;
  // ln 2 split in two; kLn2Hi has trailing zero bits so k * kLn2Hi is exact.
  static constexpr float kLn2Hi = 0.693359375f;
  static constexpr float kLn2Lo = -2.12194440e-4f;
};

template <>
struct ExpConst<double> {
  using Bits = uint64_t;
  static constexpr int kMant = 52;
  static constexpr Bits kBias = 1023;
  static constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLo = -746.0;
  static constexpr double kHi = 710.0;
  static constexpr double kFast = 708.0;
  static constexpr double kLog2e = 1.4426950408889634074;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
};

// e^r for |r| <= ln2 / 2. float: degree 6, coefficients least-squares fitted to the
// relative error on Chebyshev nodes (max error 1e-7, about the rounding error of the
// evaluation itself); double: Taylor series to degree 13 (truncation below half an ulp).
template <typename T, typename V>
EAB_INLINE V exp_poly(V r) {
  V p;
  if constexpr (sizeof(T) == 4) {
    p = r * T(0.001385929107768201) + T(0.008374763974942134);
    p = p * r + T(0.04166772432091489);
    p = p * r + T(0.1666642094513207);
    p = p * r + T(0.49999995350994275);
    p = p * r + T(1.0000000360921262);
    return p * r + T(1);
  } else {
    p = r * T(1.0 / 6227020800.0) + T(1.0 / 479001600.0);  // 1/13!, 1/12!
    p = p * r + T(1.0 / 39916800.0);
    p = p * r + T(1.0 / 3628800.0);
    p = p * r + T(1.0 / 362880.0);
    p = p * r + T(1.0 / 40320.0);
    p = p * r + T(1.0 / 5040.0);
    p = p * r + T(1.0 / 720.0);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1);
    return p * r + T(1);
  }
}

// 2^k for integer-valued k held as kShift + k (k sits in the low mantissa bits).
template <typename T, int W>
EAB_INLINE typename Vec<T, W>::v pow2_from_shifted(typename Vec<T, W>::v shifted) {
  using K = ExpConst<T>;
  using vi = typename Vec<T, W>::vi;
  // The shift's own bits all fall off the top; what is left is (k + bias) << kMant.
  const vi bits = ((vi)shifted << K::kMant) + (K::kBias << K::kMant);
  return (typename Vec<T, W>::v)bits;
}

// kInRange: the caller guarantees |x| <= kFast (or NaN), so 2^k is one normal number and
// no clamping is needed; about a third fewer instructions.
template <typename T, int W, bool kInRange = false>
EAB_INLINE typename Vec<T, W>::v vexp(typename Vec<T, W>::v x) {
  using K = ExpConst<T>;
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  const v shift = Vt::splat(K::kShift);
  if constexpr (kInRange) {
    const v k_shifted = x * K::kLog2e + shift;
    const v k = k_shifted - shift;  // round(x / ln2)
    const v r = (x - k * K::kLn2Hi) - k * K::kLn2Lo;
    return exp_poly<T>(r) * pow2_from_shifted<T, W>(k_shifted);
  }
  const v lo = Vt::splat(K::kLo), hi = Vt::splat(K::kHi);
  // NaN fails both comparisons, stays NaN and propagates through the polynomial.
  v xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v k = (xc * K::kLog2e + shift) - shift;  // round(x / ln2)
  const v r = (xc - k * K::kLn2Hi) - k * K::kLn2Lo;
  const v p = exp_poly<T>(r);
  // 2^k = 2^k1 * 2^k2 with both factors normal, so under/overflow happen in the product.
  const v k1 = k * T(0.5) + shift;
  const v k2 = (k - (k1 - shift)) + shift;
  return p * pow2_from_shifted<T, W>(k1) * pow2_from_shifted<T, W>(k2);
}

// log1p(w) for 0 <= w <= 1: log(1 + f) = 2 atanh(f / (2 + f)) with f = w, or, once
// w > sqrt(2) - 1, ln2 + log(1 + f) with f = (w - 1) / 2; either way |f / (2 + f)| < 0.172.
// Working from w itself (not a rounded 1 + w) keeps full relative accuracy for tiny w.
template <typename T, int W>
EAB_INLINE typename Vec<T, W>::v log1p_unit(typename Vec<T, W>::v w) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  const auto big = w > Vt::splat(T(0.41421356237309504880));
  const v f = big ? (w - T(1)) * T(0.5) : w;
  const v r = f / (f + T(2));
  const v r2 = r * r;
  v p;
  if constexpr (sizeof(T) == 4) {
    p = r2 * T(1.0 / 9) + T(1.0 / 7);
  } else {
    p = r2 * T(1.0 / 21) + T(1.0 / 19);
    p = p * r2 + T(1.0 / 17);
    p = p * r2 + T(1.0 / 15);
    p = p * r2 + T(1.0 / 13);
    p = p * r2 + T(1.0 / 11);
    p = p * r2 + T(1.0 / 9);
    p = p * r2 + T(1.0 / 7);
  }
  p = p * r2 + T(1.0 / 5);
  p = p * r2 + T(1.0 / 3);
  p = p * r2 + T(1);
  return (big ? Vt::splat(T(0.69314718055994530942)) : Vt::splat(T(0))) + (r + r) * p;
}

// torch.nn.functional.softplus (beta 1, threshold 20), in the overflow-free form
// max(z, 0) + log1p(exp(-|z|)).
template <typename T, int W>
EAB_INLINE typename Vec<T, W>::v softplus(typename Vec<T, W>::v z) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  const auto pos = z > Vt::splat(T(0));
  const v tail = log1p_unit<T, W>(vexp<T, W>(pos ? -z : z));
  return z > Vt::splat(T(20)) ? z : (pos ? z : Vt::splat(T(0))) + tail;
}

// d softplus / dz as torch computes it: exp(z) / (exp(z) + 1), or 1 above the threshold.
template <typename T, int W>
EAB_INLINE typename Vec<T, W>::v softplus_grad(typename Vec<T, W>::v z) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  const auto above = z > Vt::splat(T(20));
  const v e = vexp<T, W>(above ? Vt::splat(T(0)) : z);
  return above ? Vt::splat(T(1)) : e / (e + T(1));
}

// True if every product of a value in [d_lo, d_hi] and one in [a_lo, a_hi] is within the
// fast exp's range (products are monotonic in each factor, so the corners bound them all).
// False for NaN or inf bounds.
template <typename T>
bool products_in_fast_range(T d_lo, T d_hi, T a_lo, T a_hi) {
  const T p[4] = {d_lo * a_lo, d_lo * a_hi, d_hi * a_lo, d_hi * a_hi};
  bool ok = true;
  for (const T q : p) ok = ok && q >= -ExpConst<T>::kFast && q <= ExpConst<T>::kFast;
  return ok;
}

// Smallest and largest of x[0 .. n), n >= 1 (NaNs are skipped unless x[0] is one).
template <typename T, int W>
EAB_INLINE void min_max(const T* x, int64_t n, T& lo, T& hi) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  lo = hi = x[0];
  int64_t i = 0;
  if (n >= W) {
    v vlo = Vt::load(x), vhi = vlo;
    for (i = W; i + W <= n; i += W) {
      const v xi = Vt::load(x + i);
      vlo = xi < vlo ? xi : vlo;
      vhi = xi > vhi ? xi : vhi;
    }
    for (int l = 0; l < W; ++l) {
      lo = vlo[l] < lo ? vlo[l] : lo;
      hi = vhi[l] > hi ? vhi[l] : hi;
    }
  }
  for (; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
}

// sum_i a[i] * b[i] (or sum_i a[i] if b is null) over i < n, in T, by lanes (callers sum
// at most kChunk terms this way and accumulate the results in double).
template <typename T, int W>
EAB_INLINE T chunk_sum(const T* a, const T* b, int64_t n) {
  using Vt = Vec<T, W>;
  typename Vt::v acc{};
  int64_t i = 0;
  T total = T(0);
  if (b != nullptr) {
    for (; i + W <= n; i += W) acc += Vt::load(a + i) * Vt::load(b + i);
    for (; i < n; ++i) total += a[i] * b[i];
  } else {
    for (; i + W <= n; i += W) acc += Vt::load(a + i);
    for (; i < n; ++i) total += a[i];
  }
  return total + Vt::sum(acc);
}

// ---------------------------------------------------------------------------------------
// Problem description shared by the kernels (raw pointers into contiguous tensors).
// ---------------------------------------------------------------------------------------

template <typename T>
struct Scan {
  const T* u;      // (batch, dim, L)
  const T* delta;  // (batch, dim, L)
  const T* A;      // forward: (dim, N); backward: zero-padded to (dim, Np)
  const T* B;      // (batch, groups, N, L)
  const T* C;      // (batch, groups, N, L)
  const T* D;      // (dim) or nullptr
  const T* bias;   // (dim) or nullptr
  int64_t batch, dim, groups, L;
  int64_t N;   // state size
  int64_t Np;  // backward: N rounded up to whole vectors (forward: N)
  bool softplus;

  int64_t group_of(int64_t c) const { return c / (dim / groups); }
};

template <typename T>
struct BwdOut {
  const T* dy;     // (batch, dim, L)
  T* du;           // (batch, dim, L)
  T* ddelta;       // (batch, dim, L)
  T* dB;           // (splits, batch, groups, N, L): one copy per channel split
  T* dC;           // (splits, batch, groups, N, L)
  double* dA;      // (batch, dim, Np): per-batch partials, summed by the wrapper
  double* dD;      // (batch, dim)
  double* dbias;   // (batch, dim)
  int64_t splits;  // channel splits per (batch, group), see selective_scan_bwd
};

// Effective delta for K <= kChunk timesteps of one row (dl points at the first one) and, if
// dsig is given, the softplus derivative (1 without softplus). dt / dsig hold kChunk values.
template <typename T, int W>
EAB_INLINE void chunk_delta(const T* dl, T bias, bool sp, int64_t K, T* dt, T* dsig) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  if (!sp) {
    for (int64_t k = 0; k < K; ++k) dt[k] = dl[k] + bias;
    if (dsig != nullptr) std::fill(dsig, dsig + K, T(1));
    return;
  }
  // Whole vectors over a zero-padded copy, so a short last chunk needs no scalar tail.
  alignas(64) T z[kChunk];
  for (int64_t k = 0; k < K; ++k) z[k] = dl[k] + bias;
  const int64_t K_vec = (K + W - 1) / W * W;
  std::fill(z + K, z + K_vec, T(0));
  for (int64_t k = 0; k < K_vec; k += W) {
    const v zk = Vt::load(z + k);
    Vt::store(dt + k, softplus<T, W>(zk));
    if (dsig != nullptr) Vt::store(dsig + k, softplus_grad<T, W>(zk));
  }
}

// Prefetch [p, p + n) of a row (a chunk's slice of a channel's row: short, L apart from its
// neighbours, and so missed by the hardware prefetcher). for_write: about to be written.
template <typename T>
EAB_INLINE void prefetch_row(const T* p, int64_t n, bool for_write = false) {
  for (int64_t k = 0; k < n; k += 64 / sizeof(T)) {
    if (for_write) {
      __builtin_prefetch(p + k, 1);
    } else {
      __builtin_prefetch(p + k);
    }
  }
}

// Carves scratch buffers of the given sizes (in T, zero-filled) out of `storage`, each one
// starting 128 bytes further past a 4 KiB boundary than the previous one: equal-sized chunk
// buffers would otherwise share address bits 0-11, and loads from one then wait behind
// stores to another (4K aliasing). Plain T storage is used through unaligned vector loads
// and stores, as heap memory need not meet a vector type's alignment in every ISA variant.
template <typename T, size_t M>
std::array<T*, M> carve(std::vector<T>& storage, const std::array<int64_t, M>& sizes) {
  constexpr int64_t page = 4096 / sizeof(T), stagger = 128 / sizeof(T);
  std::array<int64_t, M> offsets;
  int64_t end = 0;
  for (size_t i = 0; i < M; ++i) {
    offsets[i] = (end + page - 1) / page * page + static_cast<int64_t>(i) * stagger;
    end = offsets[i] + sizes[i];
  }
  storage.assign(end, T(0));
  std::array<T*, M> out;
  for (size_t i = 0; i < M; ++i) out[i] = storage.data() + offsets[i];
  return out;
}

// ---------------------------------------------------------------------------------------
// Forward, W lanes = W consecutive channels of one group.
// ---------------------------------------------------------------------------------------

// Per-thread scratch of the forward.
template <typename T, int W>
struct FwdScratch {
  std::vector<T> storage;
  T* At;   // (N, W): A[c0 + l, n] at [n, l]
  T* x;    // (N, W): states
  T* u_y;  // (kChunk, W): u of the chunk, then y
  T* dt;   // (kChunk, W): delta of the chunk, then delta_eff
  T* dtu;  // (kChunk, W): delta_eff * u
  T* Bc;   // (2, N, kChunk): the chunk's B for up to two groups (a contiguous copy: rows
  T* Cc;   // (2, N, kChunk)   of B are L apart and would thrash L1 sets for L = 2^k)

  explicit FwdScratch(int64_t N) {
    const auto p = carve<T, 7>(storage, {N * W, N * W, kChunk * W, kChunk * W, kChunk * W,
                                         2 * N * kChunk, 2 * N * kChunk});
    At = p[0], x = p[1], u_y = p[2], dt = p[3], dtu = p[4], Bc = p[5], Cc = p[6];
  }
};

// How the forward cuts the channels into blocks of at most W lanes: normally a block lies in
// one group; when a group has exactly W / 2 channels, a block takes a pair of groups (B and
// C then differ between the two halves of a vector), which keeps all lanes busy.
struct FwdBlocks {
  int64_t dim, groups, per_group, W;
  bool pairs;

  FwdBlocks(int64_t dim_, int64_t groups_, int64_t W_)
      : dim(dim_), groups(groups_), per_group(dim_ / groups_), W(W_),
        pairs(per_group * 2 == W_ && groups_ > 1) {}

  int64_t per_batch() const {
    return pairs ? (groups + 1) / 2 : groups * ((per_group + W - 1) / W);
  }

  // Block i of a batch: first channel, lanes in use, lanes in the first group.
  void get(int64_t i, int64_t& c0, int64_t& lanes, int64_t& split) const {
    if (pairs) {
      c0 = 2 * i * per_group;
      split = per_group;
      lanes = std::min(2 * per_group, dim - c0);
    } else {
      const int64_t blocks = (per_group + W - 1) / W;
      c0 = (i / blocks) * per_group + (i % blocks) * W;
      lanes = split = std::min(W, per_group - (i % blocks) * W);
    }
  }
};

// K timesteps of one block: states x (N, W) updated in place; u_y (K, W) turns from u into
// y. Bc and Cc hold the chunk's B and C, (N, kChunk) for the group of lanes < split, and for
// kTwoGroups another (N, kChunk) for the next group, used by the lanes from split on.
template <typename T, int W, bool kInRange, bool kTwoGroups>
EAB_INLINE void fwd_steps(const T* Bc, const T* Cc, int64_t split, int64_t N, int64_t K,
                          const T* At, T* x, const T* dt, const T* dtu, T* u_y,
                          typename Vec<T, W>::v D_v) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  alignas(64) T lane_index[W];
  for (int l = 0; l < W; ++l) lane_index[l] = T(l);
  const auto first = Vt::load(lane_index) < Vt::splat(T(split));  // lanes of the 1st group
  const T* Bc1 = Bc + N * kChunk;
  const T* Cc1 = Cc + N * kChunk;
  for (int64_t k = 0; k < K; ++k) {
    const v d = Vt::load(dt + k * W);
    const v du = Vt::load(dtu + k * W);
    v acc = v{};
    for (int64_t n = 0; n < N; ++n) {
      const int64_t nk = n * kChunk + k;
      const v a = vexp<T, W, kInRange>(d * Vt::load(At + n * W));
      if constexpr (kTwoGroups) {
        const v b = first ? Vt::splat(Bc[nk]) : Vt::splat(Bc1[nk]);
        const v c = first ? Vt::splat(Cc[nk]) : Vt::splat(Cc1[nk]);
        const v xn = a * Vt::load(x + n * W) + du * b;
        Vt::store(x + n * W, xn);
        acc += xn * c;
      } else {
        const v xn = a * Vt::load(x + n * W) + du * Bc[nk];
        Vt::store(x + n * W, xn);
        acc += xn * Cc[nk];
      }
    }
    Vt::store(u_y + k * W, acc + D_v * Vt::load(u_y + k * W));
  }
}

// Inputs of one chunk [t0, t0 + K) for the block whose first channel's row starts at row0:
// u and delta of the `lanes` channels -> (K, W) lane-major buffers (padding lanes 0), and
// `rows` rows of B and C (the block's groups) -> contiguous (rows, kChunk) copies.
template <typename T, int W>
EAB_INLINE void fwd_gather_chunk(const Scan<T>& s, int64_t row0, int64_t lanes, const T* B,
                                 const T* C, int64_t rows, int64_t t0, int64_t K, T* y,
                                 FwdScratch<T, W>& w) {
  const int64_t L = s.L;
  const int64_t K_full = K / W * W;
  for (int64_t k0 = 0; k0 < K_full; k0 += W) {
    transpose_block<T, W>(s.u + row0 + t0 + k0, L, lanes, w.u_y + k0 * W, W, W);
    transpose_block<T, W>(s.delta + row0 + t0 + k0, L, lanes, w.dt + k0 * W, W, W);
  }
  for (int64_t k = K_full; k < K; ++k) {
    for (int64_t l = 0; l < W; ++l) {
      w.u_y[k * W + l] = l < lanes ? s.u[row0 + l * L + t0 + k] : T(0);
      w.dt[k * W + l] = l < lanes ? s.delta[row0 + l * L + t0 + k] : T(0);
    }
  }
  for (int64_t n = 0; n < rows; ++n) {
    std::copy(B + n * L + t0, B + n * L + t0 + K, w.Bc + n * kChunk);
    std::copy(C + n * L + t0, C + n * L + t0 + K, w.Cc + n * kChunk);
  }
  // Rows are L apart, so each holds only kChunk values of a chunk: fetch the next one now.
  const int64_t next = t0 + kChunk;
  if (next < L) {
    const int64_t len = std::min(kChunk, L - next);
    for (int64_t l = 0; l < lanes; ++l) {
      prefetch_row(s.u + row0 + l * L + next, len);
      prefetch_row(s.delta + row0 + l * L + next, len);
      prefetch_row(y + row0 + l * L + next, len, true);
    }
    for (int64_t n = 0; n < rows; ++n) {
      prefetch_row(B + n * L + next, len);
      prefetch_row(C + n * L + next, len);
    }
  }
}

// Channels [c0, c0 + lanes) of batch b, lanes <= W; those from c0 + split on (if any) are
// in the group after c0's. Lanes beyond `lanes` run on zeros and are never written out.
template <typename T, int W>
EAB_INLINE void fwd_block(const Scan<T>& s, int64_t b, int64_t c0, int64_t lanes,
                          int64_t split, T* y, FwdScratch<T, W>& w) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  const int64_t N = s.N, L = s.L;
  const int64_t bg = (b * s.groups + s.group_of(c0)) * N * L;
  const bool two_groups = split < lanes;
  const int64_t row0 = (b * s.dim + c0) * L;  // row of channel c0 + l: row0 + l * L

  std::fill(w.At, w.At + N * W, T(0));
  std::fill(w.x, w.x + N * W, T(0));
  alignas(64) T bias_l[W] = {};
  alignas(64) T D_l[W] = {};
  for (int64_t l = 0; l < lanes; ++l) {
    for (int64_t n = 0; n < N; ++n) w.At[n * W + l] = s.A[(c0 + l) * N + n];
    if (s.bias) bias_l[l] = s.bias[c0 + l];
    if (s.D) D_l[l] = s.D[c0 + l];
  }
  const v bias_v = Vt::load(bias_l);
  const v D_v = Vt::load(D_l);
  T A_lo, A_hi;
  min_max<T, W>(w.At, N * W, A_lo, A_hi);

  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    const int64_t K = std::min(kChunk, L - t0);
    fwd_gather_chunk<T, W>(s, row0, lanes, s.B + bg, s.C + bg, (two_groups ? 2 : 1) * N, t0,
                           K, y, w);
    // delta_eff and delta_eff * u, and their range over the chunk (padding lanes hold 0).
    v d_lo = v{}, d_hi = v{};
    for (int64_t k = 0; k < K; ++k) {
      const v z = Vt::load(w.dt + k * W) + bias_v;
      const v d = s.softplus ? softplus<T, W>(z) : z;
      Vt::store(w.dt + k * W, d);
      Vt::store(w.dtu + k * W, d * Vt::load(w.u_y + k * W));
      d_lo = d < d_lo ? d : d_lo;
      d_hi = d > d_hi ? d : d_hi;
    }
    alignas(64) T lanes_lo[W], lanes_hi[W];
    Vt::store(lanes_lo, d_lo);
    Vt::store(lanes_hi, d_hi);
    // Typical chunks (|delta * A| <= 87 for float) take the cheaper exp.
    const bool fast = products_in_fast_range(*std::min_element(lanes_lo, lanes_lo + W),
                                             *std::max_element(lanes_hi, lanes_hi + W), A_lo,
                                             A_hi);
    // (No lambda here: its body would not inherit the ISA variant's target attribute.)
    if (fast && two_groups) {
      fwd_steps<T, W, true, true>(w.Bc, w.Cc, split, N, K, w.At, w.x, w.dt, w.dtu, w.u_y, D_v);
    } else if (fast) {
      fwd_steps<T, W, true, false>(w.Bc, w.Cc, split, N, K, w.At, w.x, w.dt, w.dtu, w.u_y, D_v);
    } else if (two_groups) {
      fwd_steps<T, W, false, true>(w.Bc, w.Cc, split, N, K, w.At, w.x, w.dt, w.dtu, w.u_y, D_v);
    } else {
      fwd_steps<T, W, false, false>(w.Bc, w.Cc, split, N, K, w.At, w.x, w.dt, w.dtu, w.u_y, D_v);
    }
    const int64_t K_full = K / W * W;
    for (int64_t k0 = 0; k0 < K_full; k0 += W) {
      transpose_block<T, W>(w.u_y + k0 * W, W, W, y + row0 + t0 + k0, L, lanes);
    }
    for (int64_t l = 0; l < lanes; ++l) {
      for (int64_t k = K_full; k < K; ++k) y[row0 + l * L + t0 + k] = w.u_y[k * W + l];
    }
  }
}

// Blocks [begin, end) of the flattened (batch, block) index (see FwdBlocks).
template <typename T, int W>
EAB_INLINE void fwd_range(const Scan<T>& s, T* y, int64_t begin, int64_t end) {
  FwdScratch<T, W> w(s.N);
  const FwdBlocks blocks(s.dim, s.groups, W);
  for (int64_t i = begin; i < end; ++i) {
    int64_t c0, lanes, split;
    blocks.get(i % blocks.per_batch(), c0, lanes, split);
    fwd_block<T, W>(s, i / blocks.per_batch(), c0, lanes, split, y, w);
  }
}

// ---------------------------------------------------------------------------------------
// Backward, W lanes along N. A task owns one (batch, group, channel split) and walks the
// chunks with all its channels at each chunk, so the chunk's B, C, dB and dC (transposed to
// (kChunk, Np) scratch) stay in L1 while every channel uses them, for any L.
// ---------------------------------------------------------------------------------------

// Per-thread scratch of the backward.
template <typename T>
struct BwdScratch {
  std::vector<T> storage;
  T* ckpt;     // (channels, num_chunks, Np): state entering each chunk
  T* carry;    // (channels, 2, Np): adjoint g and a_next between chunks
  T* x;        // (Np): state being advanced
  T* Bk;       // (kChunk, Np): the chunk's B, transposed, zero-padded
  T* Ck;       // (kChunk, Np): the chunk's C
  T* dBk;      // (kChunk, Np): the group's dB for the chunk
  T* dCk;      // (kChunk, Np): the group's dC for the chunk
  T* as;       // (kChunk, Np): exp(dt A) of one channel's chunk
  T* xs;       // (kChunk, Np): states of one channel's chunk
  T* dA_part;  // (Np): one channel's dA over one chunk
  T* sums;     // (2, kChunk, W): lanes of the per-step sums over n
  T* dt;       // (kChunk)
  T* dsig;     // (kChunk)
  std::vector<double> dD, dbias;  // (channels)

  BwdScratch(int64_t channels, int64_t L, int64_t Np) : dD(channels), dbias(channels) {
    const int64_t tile = kChunk * Np;
    const auto p = carve<T, 13>(
        storage, {channels * ((L + kChunk - 1) / kChunk) * Np, channels * 2 * Np, Np, tile,
                  tile, tile, tile, tile, tile, Np, 2 * kChunk * kMaxLanes, kChunk, kChunk});
    ckpt = p[0], carry = p[1], x = p[2], Bk = p[3], Ck = p[4], dBk = p[5], dCk = p[6];
    as = p[7], xs = p[8], dA_part = p[9], sums = p[10], dt = p[11], dsig = p[12];
  }
};

// Columns [t0, t0 + K) of an (N, L) array -> rows of a (kChunk, Np) buffer, padding columns
// n >= N set to 0. Also prefetches the next chunk in time (see prefetch_row).
template <typename T, int W>
EAB_INLINE void load_chunk_transposed(const T* src, int64_t N, int64_t L, int64_t t0, int64_t K,
                                      int64_t Np, T* dst, int64_t next_t0) {
  const int64_t K_full = K / W * W;
  for (int64_t k0 = 0; k0 < K_full; k0 += W) {
    for (int64_t n0 = 0; n0 < Np; n0 += W) {
      transpose_block<T, W>(src + n0 * L + t0 + k0, L, N - n0, dst + k0 * Np + n0, Np, W);
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = K_full; k < K; ++k) dst[k * Np + n] = src[n * L + t0 + k];
    if (next_t0 >= 0) prefetch_row(src + n * L + next_t0, std::min(kChunk, L - next_t0));
  }
}

// Rows [0, K) of a (kChunk, Np) buffer -> columns [t0, t0 + K) of an (N, L) array, written
// or (accumulate) added.
template <typename T, int W>
EAB_INLINE void store_chunk_transposed(const T* src, int64_t N, int64_t L, int64_t t0, int64_t K,
                                       int64_t Np, T* dst, bool accumulate) {
  const int64_t K_full = K / W * W;
  for (int64_t k0 = 0; k0 < K_full; k0 += W) {
    for (int64_t n0 = 0; n0 < N; n0 += W) {
      transpose_block<T, W>(src + k0 * Np + n0, Np, W, dst + n0 * L + t0 + k0, L, N - n0,
                            accumulate);
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = K_full; k < K; ++k) {
      T& out = dst[n * L + t0 + k];
      out = accumulate ? out + src[k * Np + n] : src[k * Np + n];
    }
  }
}

template <typename T, int W, int NVC, bool kInRange>
EAB_INLINE void chunk_states_impl(const T* A, const T* Bk, const T* u, const T* dt, int64_t K,
                                  int64_t Np, T* x_mem, T* as, T* xs) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  if constexpr (NVC > 0) Np = NVC * W;
  VecState<T, W, NVC> x(x_mem);  // in registers: the recurrence is a latency chain
  for (int64_t k = 0; k < K; ++k) {
    const T dtk = dt[k];
    const T du = dtk * u[k];
    for (int64_t j = 0; j < Np; j += W) {
      const v a = vexp<T, W, kInRange>(Vt::load(A + j) * dtk);
      const v xj = a * x.get(j) + Vt::load(Bk + k * Np + j) * du;
      x.set(j, xj);
      Vt::store(as + k * Np + j, a);
      Vt::store(xs + k * Np + j, xj);
    }
  }
  x.flush();
}

// Run one channel's recurrence over a chunk of K steps from state x (Np, updated in place),
// keeping as[k] = exp(dt_k A) and the states xs[k] = x_{t0+k}, both (K, Np). Bk is the
// chunk's transposed B, u points at the chunk's first timestep, A_lo / A_hi bound A's row.
template <typename T, int W, int NVC>
EAB_INLINE void chunk_states(const T* A, T A_lo, T A_hi, const T* Bk, const T* u, const T* dt,
                             int64_t K, int64_t Np, T* x, T* as, T* xs) {
  T d_lo, d_hi;
  min_max<T, W>(dt, K, d_lo, d_hi);
  if (products_in_fast_range(d_lo, d_hi, A_lo, A_hi)) {
    chunk_states_impl<T, W, NVC, true>(A, Bk, u, dt, K, Np, x, as, xs);
  } else {
    chunk_states_impl<T, W, NVC, false>(A, Bk, u, dt, K, Np, x, as, xs);
  }
}

// The adjoint recurrence over one channel's chunk, t = K-1 .. 0 (pointers at the chunk's
// first timestep):
//   g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}        (g, a_next carried in from the next chunk)
//   dB_t += g_t dt_t u_t,  dC_t += dy_t x_t,  dA += g_t x_{t-1} exp(dt_t A) dt_t
//   du_t = dt_t sum(g_t B_t) + D dy_t
//   d(delta)_t = [sum(g_t x_{t-1} exp(dt_t A) A) + u_t sum(g_t B_t)] * softplus'
// x_prev0 is the state before the chunk. NVC > 0: Np / W known, carried vectors in registers.
// sums: (2, kChunk, W) scratch for the per-step lanes of the two sums over n.
template <typename T, int W, int NVC>
EAB_INLINE void bwd_chunk(const T* A, const T* Bk, const T* Ck, const T* as, const T* xs,
                          const T* x_prev0, const T* u, const T* dy, const T* dt, const T* dsig,
                          T Dc, int64_t K, int64_t Np, T* g_mem, T* a_next_mem, T* dBk, T* dCk,
                          T* dA_part, T* du_out, T* ddelta_out, T* sums) {
  using Vt = Vec<T, W>;
  using v = typename Vt::v;
  if constexpr (NVC > 0) Np = NVC * W;
  VecState<T, W, NVC> g(g_mem), a_next(a_next_mem), dAp(dA_part);
  for (int64_t k = K - 1; k >= 0; --k) {
    const T dyt = dy[k];
    const T ut = u[k];
    const T dtk = dt[k];
    const T dtu = dtk * ut;
    const T* ak = as + k * Np;
    const T* xk = xs + k * Np;
    const T* xprev = k > 0 ? xs + (k - 1) * Np : x_prev0;
    v gb = v{};   // lanes of sum_n g B, summed over lanes below
    v gxa = v{};  // lanes of sum_n g x_{t-1} exp(dt A) A
    for (int64_t j = 0; j < Np; j += W) {
      const int64_t kj = k * Np + j;
      const v a = Vt::load(ak + j);
      const v gn = Vt::load(Ck + kj) * dyt + a_next.get(j) * g.get(j);
      g.set(j, gn);
      a_next.set(j, a);
      Vt::store(dBk + kj, Vt::load(dBk + kj) + gn * dtu);
      Vt::store(dCk + kj, Vt::load(dCk + kj) + Vt::load(xk + j) * dyt);
      const v gx = gn * Vt::load(xprev + j) * a;
      dAp.set(j, dAp.get(j) + gx * dtk);
      gxa += gx * Vt::load(A + j);
      gb += gn * Vt::load(Bk + kj);
    }
    Vt::store(sums + k * W, gb);
    Vt::store(sums + (kChunk + k) * W, gxa);
  }
  // Horizontal sums W steps at a time, then du and d(delta) as vectors over t.
  const int64_t K_vec = (K + W - 1) / W * W;
  std::fill(sums + K * W, sums + K_vec * W, T(0));
  std::fill(sums + (kChunk + K) * W, sums + (kChunk + K_vec) * W, T(0));
  for (int64_t k0 = 0; k0 < K_vec; k0 += W) {
    v r_gb[W], r_gxa[W];
    for (int i = 0; i < W; ++i) {
      r_gb[i] = Vt::load(sums + (k0 + i) * W);
      r_gxa[i] = Vt::load(sums + (kChunk + k0 + i) * W);
    }
    row_sum_stages<v, W, W / 2>(r_gb);
    row_sum_stages<v, W, W / 2>(r_gxa);
    if (k0 + W <= K) {
      Vt::store(du_out + k0, Vt::load(dt + k0) * r_gb[0] + Vt::load(dy + k0) * Dc);
      // Through bias and softplus.
      Vt::store(ddelta_out + k0,
                (r_gxa[0] + Vt::load(u + k0) * r_gb[0]) * Vt::load(dsig + k0));
    } else {
      alignas(64) T s_gb[W], s_gxa[W];
      Vt::store(s_gb, r_gb[0]);
      Vt::store(s_gxa, r_gxa[0]);
      for (int64_t k = k0; k < K; ++k) {
        du_out[k] = dt[k] * s_gb[k - k0] + Dc * dy[k];
        ddelta_out[k] = (s_gxa[k - k0] + u[k] * s_gb[k - k0]) * dsig[k];
      }
    }
  }
  g.flush();
  a_next.flush();
  dAp.flush();
}

// Channels [c_begin, c_end) of batch b (at most kPassChannels), all in one group; their
// dB / dC sum is written (accumulate: added) to dB / dC, (N, L) slices.
template <typename T, int W, int NVC>
EAB_INLINE void bwd_channels(const Scan<T>& s, const BwdOut<T>& o, int64_t b, int64_t c_begin,
                             int64_t c_end, T* dB, T* dC, bool accumulate, BwdScratch<T>& w) {
  const int64_t L = s.L, N = s.N, Np = s.Np;
  const int64_t channels = c_end - c_begin;
  const int64_t num_chunks = (L + kChunk - 1) / kChunk;
  const int64_t bg = (b * s.groups + s.group_of(c_begin)) * N * L;
  const T* B = s.B + bg;  // (N, L)
  const T* C = s.C + bg;  // (N, L)
  T* const dt = w.dt;
  T* const dsig = w.dsig;
  T* const x = w.x;
  // Per channel: its rows, A row bounds, bias, D.
  const auto row_of = [&](int64_t i) { return (b * s.dim + c_begin + i) * L; };
  const auto A_of = [&](int64_t i) { return s.A + (c_begin + i) * Np; };
  const auto bias_of = [&](int64_t i) { return s.bias ? s.bias[c_begin + i] : T(0); };
  std::vector<T> A_lo(channels), A_hi(channels);
  for (int64_t i = 0; i < channels; ++i) min_max<T, W>(A_of(i), Np, A_lo[i], A_hi[i]);

  // Pass 1, chunk by chunk: the state of every channel entering every chunk.
  std::fill(w.carry, w.carry + channels * 2 * Np, T(0));  // first: each channel's state
  for (int64_t jc = 0; jc < num_chunks; ++jc) {
    const int64_t t0 = jc * kChunk;
    const bool last = jc + 1 == num_chunks;  // the last chunk's end state is never needed
    if (!last) {
      const int64_t next = jc + 2 < num_chunks ? t0 + kChunk : -1;
      load_chunk_transposed<T, W>(B, N, L, t0, kChunk, Np, w.Bk, next);
    }
    for (int64_t i = 0; i < channels; ++i) {
      T* state = w.carry + i * 2 * Np;
      std::copy(state, state + Np, w.ckpt + (i * num_chunks + jc) * Np);
      if (last) continue;
      if (jc + 2 < num_chunks) {
        prefetch_row(s.u + row_of(i) + t0 + kChunk, kChunk);
        prefetch_row(s.delta + row_of(i) + t0 + kChunk, kChunk);
      }
      chunk_delta<T, W>(s.delta + row_of(i) + t0, bias_of(i), s.softplus, kChunk, dt, nullptr);
      chunk_states<T, W, NVC>(A_of(i), A_lo[i], A_hi[i], w.Bk, s.u + row_of(i) + t0, dt,
                         kChunk, Np, state, w.as, w.xs);
    }
  }

  // Pass 2, chunks in reverse: recompute each channel's states over the chunk, then run its
  // adjoint recurrence backwards through it; the group's dB / dC for the chunk gather in L1.
  std::fill(w.carry, w.carry + channels * 2 * Np, T(0));  // now g and a_next
  std::fill(w.dD.begin(), w.dD.end(), 0.0);
  std::fill(w.dbias.begin(), w.dbias.end(), 0.0);
  for (int64_t i = 0; i < channels; ++i) {
    double* dA_row = o.dA + (b * s.dim + c_begin + i) * Np;
    std::fill(dA_row, dA_row + Np, 0.0);
  }
  for (int64_t jc = num_chunks - 1; jc >= 0; --jc) {
    const int64_t t0 = jc * kChunk;
    const int64_t K = std::min(kChunk, L - t0);
    const int64_t next = jc > 0 ? t0 - kChunk : -1;  // the previous chunk in time
    load_chunk_transposed<T, W>(B, N, L, t0, K, Np, w.Bk, next);
    load_chunk_transposed<T, W>(C, N, L, t0, K, Np, w.Ck, next);
    std::fill(w.dBk, w.dBk + kChunk * Np, T(0));
    std::fill(w.dCk, w.dCk + kChunk * Np, T(0));
    for (int64_t i = 0; i < channels; ++i) {
      const int64_t row = row_of(i) + t0;
      if (jc > 0) {  // the previous chunk in time is the next one processed
        for (const T* p : {s.u, s.delta, o.dy}) prefetch_row(p + row - kChunk, kChunk);
        for (const T* p : {o.du, o.ddelta}) prefetch_row(p + row - kChunk, kChunk, true);
      }
      const T* x_prev0 = w.ckpt + (i * num_chunks + jc) * Np;
      std::copy(x_prev0, x_prev0 + Np, x);
      chunk_delta<T, W>(s.delta + row, bias_of(i), s.softplus, K, dt, dsig);
      chunk_states<T, W, NVC>(A_of(i), A_lo[i], A_hi[i], w.Bk, s.u + row, dt, K, Np, x,
                         w.as, w.xs);
      T* carry = w.carry + i * 2 * Np;
      std::fill(w.dA_part, w.dA_part + Np, T(0));
      bwd_chunk<T, W, NVC>(A_of(i), w.Bk, w.Ck, w.as, w.xs, x_prev0,
                           s.u + row, o.dy + row, dt, dsig, s.D ? s.D[c_begin + i] : T(0), K,
                           Np, carry, carry + Np, w.dBk, w.dCk, w.dA_part,
                           o.du + row, o.ddelta + row, w.sums);
      // dA, dD and d(bias) sum over up to L terms: per-chunk sums (at most kChunk terms, in
      // T) are accumulated in double.
      double* dA_row = o.dA + (b * s.dim + c_begin + i) * Np;
      for (int64_t n = 0; n < Np; ++n) dA_row[n] += static_cast<double>(w.dA_part[n]);
      w.dbias[i] += static_cast<double>(chunk_sum<T, W>(o.ddelta + row, nullptr, K));
      w.dD[i] += static_cast<double>(chunk_sum<T, W>(o.dy + row, s.u + row, K));
    }
    store_chunk_transposed<T, W>(w.dBk, N, L, t0, K, Np, dB, accumulate);
    store_chunk_transposed<T, W>(w.dCk, N, L, t0, K, Np, dC, accumulate);
  }
  for (int64_t i = 0; i < channels; ++i) {
    o.dD[b * s.dim + c_begin + i] = w.dD[i];
    o.dbias[b * s.dim + c_begin + i] = w.dbias[i];
  }
}

// Tasks [begin, end) of the flattened (batch, group, split) index.
template <typename T, int W, int NVC>
EAB_INLINE void bwd_range(const Scan<T>& s, const BwdOut<T>& o, int64_t begin, int64_t end) {
  const int64_t per_group = s.dim / s.groups;
  const int64_t per_task = (per_group + o.splits - 1) / o.splits;
  BwdScratch<T> w(std::min(per_task, kPassChannels), s.L, s.Np);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t split = task % o.splits;
    const int64_t bg = task / o.splits;  // b * groups + grp
    const int64_t grp = bg % s.groups;
    const int64_t c_begin = grp * per_group + split * per_group / o.splits;
    const int64_t c_end = grp * per_group + (split + 1) * per_group / o.splits;
    const int64_t slice = (split * s.batch * s.groups + bg) * s.N * s.L;
    for (int64_t c = c_begin; c < c_end; c += kPassChannels) {
      bwd_channels<T, W, NVC>(s, o, bg / s.groups, c, std::min(c + kPassChannels, c_end),
                              o.dB + slice, o.dC + slice, c > c_begin, w);
    }
  }
}

// ---------------------------------------------------------------------------------------
// ISA variants: the templates above compiled for baseline x86-64 (SSE2), AVX2 + FMA and
// AVX-512, picked at run time, so the built library runs on any x86-64 CPU.
// ---------------------------------------------------------------------------------------

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

template <typename T>
using FwdFn = void (*)(const Scan<T>&, T*, int64_t, int64_t);
template <typename T>
using BwdFn = void (*)(const Scan<T>&, const BwdOut<T>&, int64_t, int64_t);

#define EAB_ISA_KERNELS(NS, ATTR)                                                  \
  namespace NS {                                                                   \
  template <typename T, int W>                                                     \
  ATTR void fwd(const Scan<T>& s, T* y, int64_t begin, int64_t end) {              \
    fwd_range<T, W>(s, y, begin, end);                                             \
  }                                                                                \
  template <typename T, int W, int NVC>                                            \
  ATTR void bwd(const Scan<T>& s, const BwdOut<T>& o, int64_t begin, int64_t end) { \
    bwd_range<T, W, NVC>(s, o, begin, end);                                        \
  }                                                                                \
  }

EAB_ISA_KERNELS(isa_base, )

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EAB_HAVE_X86_VARIANTS 1
EAB_ISA_KERNELS(isa_avx2, __attribute__((target("avx2,fma,bmi2"))))
EAB_ISA_KERNELS(isa_avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,"
                                                  "bmi2,prefer-vector-width=512"))))
#endif

// Vector widths (bytes) an ISA variant is instantiated for: its own and half of it (fewer
// wasted lanes for small N or few channels per group); the baseline has 16 bytes only.
int full_bytes(Isa isa) { return isa == Isa::kAvx512 ? 64 : isa == Isa::kAvx2 ? 32 : 16; }
int half_bytes(Isa isa) { return isa == Isa::kBase ? 16 : full_bytes(isa) / 2; }

// `lanes` wide vectors of T compiled for `isa`: forward kernel.
template <typename T>
FwdFn<T> fwd_kernel(Isa isa, int64_t lanes) {
  constexpr int64_t e = sizeof(T);
  switch (static_cast<int>(isa) * 100 + static_cast<int>(lanes * e)) {  // ISA, vector bytes
#ifdef EAB_HAVE_X86_VARIANTS
    case 264: return isa_avx512::fwd<T, 64 / e>;
    case 232: return isa_avx512::fwd<T, 32 / e>;
    case 132: return isa_avx2::fwd<T, 32 / e>;
    case 116: return isa_avx2::fwd<T, 16 / e>;
#endif
    case 16: return isa_base::fwd<T, 16 / e>;
  }
  TORCH_CHECK(false, "selective_scan_cpu: no forward kernel for this vector width");
  return nullptr;
}

// Backward kernel; nv: vectors per state, specialised for 1 and 2 (state in registers).
template <typename T, int W>
BwdFn<T> bwd_kernel_nv(Isa isa, int64_t nv) {
  constexpr int bytes = W * static_cast<int>(sizeof(T));
#ifdef EAB_HAVE_X86_VARIANTS
  if constexpr (bytes == 64 || bytes == 32) {
    if (isa == Isa::kAvx512) {
      return nv == 1 ? isa_avx512::bwd<T, W, 1>
             : nv == 2 ? isa_avx512::bwd<T, W, 2> : isa_avx512::bwd<T, W, 0>;
    }
  }
  if constexpr (bytes == 32 || bytes == 16) {
    if (isa == Isa::kAvx2) {
      return nv == 1 ? isa_avx2::bwd<T, W, 1>
             : nv == 2 ? isa_avx2::bwd<T, W, 2> : isa_avx2::bwd<T, W, 0>;
    }
  }
#endif
  if constexpr (bytes == 16) {
    // The fallback for CPUs without AVX2: not specialised, to save compile time.
    if (isa == Isa::kBase) return isa_base::bwd<T, W, 0>;
  }
  TORCH_CHECK(false, "selective_scan_cpu: no backward kernel for this vector width");
  return nullptr;
}

template <typename T>
BwdFn<T> bwd_kernel(Isa isa, int64_t lanes, int64_t nv) {
  switch (lanes * static_cast<int64_t>(sizeof(T))) {
    case 64: return bwd_kernel_nv<T, 64 / sizeof(T)>(isa, nv);
    case 32: return bwd_kernel_nv<T, 32 / sizeof(T)>(isa, nv);
    default: return bwd_kernel_nv<T, 16 / sizeof(T)>(isa, nv);
  }
}

// Forward lanes: the full width if a group, or a pair of groups, fills it, else half of it.
int64_t fwd_lanes(Isa isa, int64_t elem_size, int64_t per_group, int64_t groups) {
  const int64_t full = full_bytes(isa) / elem_size;
  const bool pairs = per_group * 2 == full && groups > 1;
  return per_group >= full || pairs ? full : half_bytes(isa) / elem_size;
}

// Backward lanes: whichever of the two widths pads N less (the wider one on a tie).
int64_t bwd_lanes(Isa isa, int64_t elem_size, int64_t N) {
  const int64_t full = full_bytes(isa) / elem_size;
  const int64_t half = half_bytes(isa) / elem_size;
  const auto padded = [N](int64_t lanes) { return (N + lanes - 1) / lanes * lanes; };
  return padded(half) < padded(full) ? half : full;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

Isa best_isa() {
#ifdef EAB_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa& current_isa() {
  static Isa isa = best_isa();
  return isa;
}

// Select a variant by name ("base", "avx2", "avx512" or "best"), for tests and benchmarks.
// Refuses one this CPU cannot run. Returns the name now in use.
std::string set_isa(const std::string& name) {
  const Isa best = best_isa();
  Isa want = best;
  if (name == "base") {
    want = Isa::kBase;
  } else if (name == "avx2") {
    want = Isa::kAvx2;
  } else if (name == "avx512") {
    want = Isa::kAvx512;
  } else {
    TORCH_CHECK(name == "best", "unknown ISA variant '", name, "' (base, avx2, avx512, best)");
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "this CPU cannot run the '",
              name, "' variant (best: '", isa_name(best), "')");
  current_isa() = want;
  return isa_name(want);
}

std::string get_isa() { return isa_name(current_isa()); }

// ---------------------------------------------------------------------------------------
// Tensor wrappers.
// ---------------------------------------------------------------------------------------

struct Inputs {
  torch::Tensor u, delta, A, B, C, D, bias;  // D / bias undefined if absent
  int64_t batch, dim, groups, L, N;
};

Inputs check_inputs(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                    const torch::Tensor& B, const torch::Tensor& C,
                    const std::optional<torch::Tensor>& D,
                    const std::optional<torch::Tensor>& delta_bias) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU");
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "selective_scan_cpu: only float32 and float64 are supported, got ",
              u.scalar_type());
  TORCH_CHECK(u.dim() == 3, "u must be (batch, dim, L), got ", u.sizes());
  Inputs in;
  in.batch = u.size(0);
  in.dim = u.size(1);
  in.L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == in.dim, "A must be (dim, N), got ", A.sizes());
  in.N = A.size(1);
  TORCH_CHECK(in.N > 0, "A must have N >= 1");
  TORCH_CHECK(B.dim() == 4 && B.size(0) == in.batch && B.size(2) == in.N && B.size(3) == in.L,
              "B must be (batch, groups, N, L), got ", B.sizes());
  in.groups = B.size(1);
  TORCH_CHECK(in.groups > 0 && in.dim % in.groups == 0, "groups (", in.groups,
              ") must divide dim (", in.dim, ")");
  TORCH_CHECK(C.sizes() == B.sizes(), "C must have B's shape ", B.sizes(), ", got ", C.sizes());
  TORCH_CHECK(delta.sizes() == u.sizes(), "delta must have u's shape");
  const auto check = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == u.scalar_type(), name,
                " must be a CPU tensor of u's dtype");
  };
  check(delta, "delta");
  check(A, "A");
  check(B, "B");
  check(C, "C");
  in.u = u.contiguous();
  in.delta = delta.contiguous();
  in.A = A;
  in.B = B;
  in.C = C;
  if (D.has_value() && D->defined()) {
    check(*D, "D");
    TORCH_CHECK(D->dim() == 1 && D->size(0) == in.dim, "D must be (dim,)");
    in.D = D->contiguous();
  }
  if (delta_bias.has_value() && delta_bias->defined()) {
    check(*delta_bias, "delta_bias");
    TORCH_CHECK(delta_bias->dim() == 1 && delta_bias->size(0) == in.dim,
                "delta_bias must be (dim,)");
    in.bias = delta_bias->contiguous();
  }
  return in;
}

// (rows..., N) tensor -> contiguous (rows..., padded_n) with zero padding lanes.
torch::Tensor pad_last(const torch::Tensor& t, int64_t padded_n) {
  if (t.size(-1) == padded_n) return t.contiguous();
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = padded_n;
  torch::Tensor out = torch::zeros(shape, t.options());
  out.narrow(-1, 0, t.size(-1)).copy_(t);
  return out;
}

// A must already be in the layout the kernel expects (see Scan).
template <typename T>
Scan<T> make_scan(const Inputs& in, const torch::Tensor& A, const torch::Tensor& B,
                  const torch::Tensor& C, int64_t Np, bool softplus) {
  Scan<T> s;
  s.u = in.u.data_ptr<T>();
  s.delta = in.delta.data_ptr<T>();
  s.A = A.data_ptr<T>();
  s.B = B.data_ptr<T>();
  s.C = C.data_ptr<T>();
  s.D = in.D.defined() ? in.D.data_ptr<T>() : nullptr;
  s.bias = in.bias.defined() ? in.bias.data_ptr<T>() : nullptr;
  s.batch = in.batch;
  s.dim = in.dim;
  s.groups = in.groups;
  s.L = in.L;
  s.N = in.N;
  s.Np = Np;
  s.softplus = softplus;
  return s;
}

torch::Tensor selective_scan_fwd(const torch::Tensor& u, const torch::Tensor& delta,
                                 const torch::Tensor& A, const torch::Tensor& B,
                                 const torch::Tensor& C, const std::optional<torch::Tensor>& D,
                                 const std::optional<torch::Tensor>& delta_bias,
                                 bool delta_softplus) {
  const Inputs in = check_inputs(u, delta, A, B, C, D, delta_bias);
  const Isa isa = current_isa();
  const torch::Tensor A_c = in.A.contiguous();  // (dim, N)
  const torch::Tensor B_c = in.B.contiguous();  // (batch, groups, N, L)
  const torch::Tensor C_c = in.C.contiguous();
  torch::Tensor y = torch::empty_like(in.u);  // (batch, dim, L)
  const int64_t per_group = in.dim / in.groups;
  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "selective_scan_fwd", [&] {
    const Scan<scalar_t> s = make_scan<scalar_t>(in, A_c, B_c, C_c, in.N, delta_softplus);
    const int64_t lanes = fwd_lanes(isa, sizeof(scalar_t), per_group, in.groups);
    const FwdFn<scalar_t> fwd = fwd_kernel<scalar_t>(isa, lanes);
    const int64_t blocks = in.batch * FwdBlocks(in.dim, in.groups, lanes).per_batch();
    // Blocks per task: at least ~64k state updates, so tiny problems stay on one thread.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (in.L * in.N * lanes));
    scalar_t* y_ptr = y.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain,
                     [&](int64_t begin, int64_t end) { fwd(s, y_ptr, begin, end); });
  });
  return y;
}

std::vector<torch::Tensor> selective_scan_bwd(
    const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
    const torch::Tensor& B, const torch::Tensor& C, const std::optional<torch::Tensor>& D,
    const std::optional<torch::Tensor>& delta_bias, bool delta_softplus,
    const torch::Tensor& dy) {
  const Inputs in = check_inputs(u, delta, A, B, C, D, delta_bias);
  TORCH_CHECK(dy.sizes() == u.sizes() && dy.device().is_cpu() &&
                  dy.scalar_type() == u.scalar_type(),
              "dy must be a CPU tensor of u's shape and dtype");
  const torch::Tensor dy_c = dy.contiguous();
  const torch::Tensor B_c = in.B.contiguous();  // (batch, groups, N, L)
  const torch::Tensor C_c = in.C.contiguous();
  const Isa isa = current_isa();
  const int64_t lanes = bwd_lanes(isa, in.u.element_size(), in.N);
  const int64_t Np = (in.N + lanes - 1) / lanes * lanes;
  const torch::Tensor A_p = pad_last(in.A, Np);  // (dim, Np)

  // dB / dC sum over a group's channels, so tasks are (batch, group) pairs. With fewer of
  // those than threads (e.g. batch 1, groups 1) each group's channels are split further,
  // every split writing its own dB / dC copy, summed below.
  const int64_t base_tasks = in.batch * in.groups;
  const int64_t threads = at::get_num_threads();
  const int64_t per_group = in.dim / in.groups;
  const int64_t splits =
      base_tasks >= threads ? 1 : std::min(per_group, (threads + base_tasks - 1) / base_tasks);

  const auto opts = in.u.options();
  const auto dopts = opts.dtype(at::kDouble);
  torch::Tensor du = torch::empty_like(in.u);
  torch::Tensor ddelta = torch::empty_like(in.u);
  torch::Tensor dB = torch::empty({splits, in.batch, in.groups, in.N, in.L}, opts);
  torch::Tensor dC = torch::empty({splits, in.batch, in.groups, in.N, in.L}, opts);
  torch::Tensor dA_b = torch::empty({in.batch, in.dim, Np}, dopts);
  torch::Tensor dD_b = torch::empty({in.batch, in.dim}, dopts);
  torch::Tensor dbias_b = torch::empty({in.batch, in.dim}, dopts);

  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "selective_scan_bwd", [&] {
    const Scan<scalar_t> s = make_scan<scalar_t>(in, A_p, B_c, C_c, Np, delta_softplus);
    const BwdFn<scalar_t> bwd = bwd_kernel<scalar_t>(isa, lanes, Np / lanes);
    BwdOut<scalar_t> o;
    o.dy = dy_c.data_ptr<scalar_t>();
    o.du = du.data_ptr<scalar_t>();
    o.ddelta = ddelta.data_ptr<scalar_t>();
    o.dB = dB.data_ptr<scalar_t>();
    o.dC = dC.data_ptr<scalar_t>();
    o.dA = dA_b.data_ptr<double>();
    o.dD = dD_b.data_ptr<double>();
    o.dbias = dbias_b.data_ptr<double>();
    o.splits = splits;
    at::parallel_for(0, base_tasks * splits, 1,
                     [&](int64_t begin, int64_t end) { bwd(s, o, begin, end); });
  });

  torch::Tensor dA = dA_b.sum(0).narrow(-1, 0, in.N).to(in.u.scalar_type()).contiguous();
  torch::Tensor dD, dbias;  // undefined (None in Python) when the input is absent
  if (in.D.defined()) dD = dD_b.sum(0).to(in.u.scalar_type());
  if (in.bias.defined()) dbias = dbias_b.sum(0).to(in.u.scalar_type());
  return {du, ddelta, dA, splits == 1 ? dB[0] : dB.sum(0), splits == 1 ? dC[0] : dC.sum(0), dD,
          dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU selective scan (mamba_ssm selective_scan_fn semantics)";
  // The GIL is released while the kernels run (arguments are converted before that).
  m.def("fwd", &selective_scan_fwd, "selective scan forward -> y", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
        py::arg("delta_bias"), py::arg("delta_softplus"),
        py::call_guard<py::gil_scoped_release>());
  m.def("bwd", &selective_scan_bwd,
        "selective scan backward -> [du, ddelta, dA, dB, dC, dD, ddelta_bias]", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
        py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("dy"),
        py::call_guard<py::gil_scoped_release>());
  m.def("set_isa", &set_isa, "select the SIMD variant: base, avx2, avx512 or best");
  m.def("get_isa", &get_isa, "name of the SIMD variant in use");
}
