// Cache-resident EM routing on CPU (see matcaps/routing/blocked.py for the Python side).
//
// A *block* is one (sample, parent position) pair: its votes V[i][h][c] (I children,
// 16 pose entries, C parent types) are computed from the child poses and the transforms
// into a per-thread buffer that stays in cache, used by the M-step and the E-step, and
// dropped; only per-parent statistics and per-(window slot, parent type) routing values
// (1/16 of the votes) are written to memory.  Each EM iteration is one pass over all
// blocks; between two passes the per-child log-sum-exp of the E-step is reduced over the
// windows that read the child (child-sized data).  The backward pass recomputes the votes
// the same way, one pass per iteration in reverse, and gathers the votes' gradient of all
// iterations in the last pass, where it is turned into the gradients of the poses and
// transforms without ever being stored.
//
// Vectorisation: parent types are the innermost dimension, in chunks of kLanes (padded
// with inert types), so every M-step, E-step and vote loop is a vertical operation over
// lanes; the only horizontal reductions are per (block, child).  Threads: the blocks are cut
// into a fixed number of contiguous ranges that the threads take one after the other (so a
// thread that the OS preempts delays one range, not half the work), with one partial sum per
// range for the parameter gradients, summed in a fixed order: results do not depend on the
// number of threads or on scheduling.
//
// Equations and their gradients: see the module docstring of matcaps/routing/fused.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace matcaps_blocked {

constexpr int64_t kSide = 4;      // poses are 4x4 matrices
constexpr int64_t kEntries = 16;  // H, pose entries
constexpr int64_t kLanes = 16;    // parent types per vector chunk
constexpr int64_t kChunk = kEntries * kLanes;  // values of one child's votes in one chunk
constexpr double kLog2Pi = 1.8378770664093453;

// ------------------------------------------------------------------ vectors of parent types
// GCC/Clang vector extensions: one Vec holds kLanes values (one zmm register for float, two
// for double); arithmetic, comparisons (integer masks) and ?: work lane by lane.

template <typename T> struct Lanes;
template <> struct Lanes<float> {
  typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t Int __attribute__((vector_size(kLanes * sizeof(float))));
  using Scalar = int32_t;
  static constexpr int kMantissa = 23;
  static constexpr Scalar kBias = 127;
};
template <> struct Lanes<double> {
  typedef double Vec __attribute__((vector_size(kLanes * sizeof(double))));
  typedef int64_t Int __attribute__((vector_size(kLanes * sizeof(double))));
  using Scalar = int64_t;
  static constexpr int kMantissa = 52;
  static constexpr Scalar kBias = 1023;
};
template <typename T> using Vec = typename Lanes<T>::Vec;
template <typename T> using IntVec = typename Lanes<T>::Int;

template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}
template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, const Vec<T>& v) {
  __builtin_memcpy(p, &v, sizeof v);
}
// Horizontal sum and maximum: a tree of shuffles (4 steps instead of 15 dependent adds).
template <typename T>
inline T sum_lanes(const Vec<T>& v) {
  const Vec<T> s8 = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  const Vec<T> s4 = s8 + __builtin_shufflevector(s8, s8, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  const Vec<T> s2 = s4 + __builtin_shufflevector(s4, s4, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return s2[0] + s2[1];
}
template <typename T>
inline T max_lanes(const Vec<T>& v) {
  const Vec<T> o8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  const Vec<T> m8 = v > o8 ? v : o8;
  const Vec<T> o4 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  const Vec<T> m4 = m8 > o4 ? m8 : o4;
  const Vec<T> o2 = __builtin_shufflevector(m4, m4, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const Vec<T> m2 = m4 > o2 ? m4 : o2;
  return m2[0] > m2[1] ? m2[0] : m2[1];
}
// The sums of 16 vectors at once (a transposing tree of 15 folds): result[k] = sum of the lanes of in[k].
// Each fold adds the lower and upper halves of two vectors' lane groups; the inputs are
// visited in the order that leaves the sums in natural order.
template <typename T>
inline Vec<T> sum_lanes_of_16(const Vec<T>* in) {
  static_assert(kLanes == 16, "the transposing tree is written for 16 lanes");
  Vec<T> a[16];
  for (int64_t k = 0; k < 16; ++k) {
    const int64_t q = (k & 3) == 1 ? 2 : ((k & 3) == 2 ? 1 : (k & 3));
    a[k] = in[4 * q + 2 * ((k >> 2) & 1) + (k >> 3)];
  }
  Vec<T> c[8], d[4], e[2];
  for (int k = 0; k < 8; ++k) {
    c[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int k = 0; k < 4; ++k) {
    d[k] = __builtin_shufflevector(c[2 * k], c[2 * k + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * k], c[2 * k + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  for (int k = 0; k < 2; ++k) {
    e[k] = __builtin_shufflevector(d[2 * k], d[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(d[2 * k], d[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  return __builtin_shufflevector(e[0], e[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(e[0], e[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
template <typename T>
inline Vec<T> select(const IntVec<T>& mask, const Vec<T>& a, const Vec<T>& b) {
  return mask ? a : b;
}

// exp(x) to about 1 ulp: x = n ln2 + r, |r| <= ln2/2, Taylor polynomial of r (degree 7 for
// float, 13 for double: truncation below half an ulp), scaled by 2^n in two steps so that
// subnormal results are rounded gradually; 0 below the subnormal range, inf above.
template <typename T>
inline Vec<T> vexp(const Vec<T>& x) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  using L = Lanes<T>;
  const T max_x = kFloat ? T(88.72283) : T(709.782712893384);
  const T min_x = kFloat ? T(-103.97208) : T(-745.1332191019412);
  const T ln2_hi = kFloat ? T(0.693359375) : T(6.93145751953125e-1);
  const T ln2_lo = kFloat ? T(-2.12194440e-4) : T(1.42860682030941723212e-6);
  const T round = kFloat ? T(12582912.0) : T(6755399441055744.0);  // 1.5 * 2^mantissa
  Vec<T> c = select<T>(x < min_x, splat(min_x), x);
  c = select<T>(c > max_x, splat(max_x), c);
  const Vec<T> n = (c * T(1.4426950408889634) + round) - round;
  const Vec<T> r = (c - n * ln2_hi) - n * ln2_lo;
  Vec<T> p;
  if constexpr (kFloat) {
    p = splat(T(1.0 / 5040));
    p = p * r + T(1.0 / 720);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  } else {
    p = splat(T(1.0 / 6227020800.0));
    p = p * r + T(1.0 / 479001600.0);
    p = p * r + T(1.0 / 39916800.0);
    p = p * r + T(1.0 / 3628800.0);
    p = p * r + T(1.0 / 362880.0);
    p = p * r + T(1.0 / 40320.0);
    p = p * r + T(1.0 / 5040.0);
    p = p * r + T(1.0 / 720.0);
    p = p * r + T(1.0 / 120.0);
    p = p * r + T(1.0 / 24.0);
    p = p * r + T(1.0 / 6.0);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  }
  const IntVec<T> e = __builtin_convertvector(n, IntVec<T>);
  const IntVec<T> half = e >> 1;
  const Vec<T> scale_a = (Vec<T>)((half + L::kBias) << L::kMantissa);
  const Vec<T> scale_b = (Vec<T>)((e - half + L::kBias) << L::kMantissa);
  Vec<T> result = p * scale_a * scale_b;
  result = select<T>(x > max_x, splat(std::numeric_limits<T>::infinity()), result);
  result = select<T>(x < min_x, splat(T(0)), result);
  return select<T>(x != x, x, result);  // NaN stays NaN
}

// ln(x) to about 1 ulp: x = 2^e m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s),
// s = (m - 1)/(m + 1), |s| <= 0.1716, odd series of s (to s^9 for float, s^21 for double).
template <typename T>
inline Vec<T> vlog(const Vec<T>& x) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  using L = Lanes<T>;
  using S = typename L::Scalar;
  const T ln2_hi = kFloat ? T(0.693359375) : T(6.93145751953125e-1);
  const T ln2_lo = kFloat ? T(-2.12194440e-4) : T(1.42860682030941723212e-6);
  const IntVec<T> subnormal = x < std::numeric_limits<T>::min();
  const Vec<T> scaled = select<T>(subnormal, x * T(S(1) << L::kMantissa), x);
  const IntVec<T> bits = (IntVec<T>)scaled;
  const S exponent_mask = (S(1) << (sizeof(T) * 8 - 1 - L::kMantissa)) - 1;
  IntVec<T> exponent = ((bits >> L::kMantissa) & exponent_mask) - L::kBias;
  exponent = subnormal ? exponent - L::kMantissa : exponent;
  Vec<T> m = (Vec<T>)((bits & ((S(1) << L::kMantissa) - 1)) | (L::kBias << L::kMantissa));
  const IntVec<T> above = m > T(1.4142135623730951);
  m = select<T>(above, m * T(0.5), m);
  exponent = above ? exponent + 1 : exponent;
  const Vec<T> f = m - T(1);
  const Vec<T> s = f / (f + T(2));
  const Vec<T> s2 = s * s;
  Vec<T> p;
  if constexpr (kFloat) {
    p = splat(T(1.0 / 9));
    p = p * s2 + T(1.0 / 7);
    p = p * s2 + T(1.0 / 5);
    p = p * s2 + T(1.0 / 3);
    p = p * s2 + T(1);
  } else {
    p = splat(T(1.0 / 21));
    p = p * s2 + T(1.0 / 19);
    p = p * s2 + T(1.0 / 17);
    p = p * s2 + T(1.0 / 15);
    p = p * s2 + T(1.0 / 13);
    p = p * s2 + T(1.0 / 11);
    p = p * s2 + T(1.0 / 9);
    p = p * s2 + T(1.0 / 7);
    p = p * s2 + T(1.0 / 5);
    p = p * s2 + T(1.0 / 3);
    p = p * s2 + T(1);
  }
  const Vec<T> e = __builtin_convertvector(exponent, Vec<T>);
  const Vec<T> result = e * ln2_hi + (T(2) * s * p + e * ln2_lo);
  const T inf = std::numeric_limits<T>::infinity();
  const Vec<T> special = select<T>(x == T(0), splat(-inf), select<T>(x == inf, splat(inf), splat(std::numeric_limits<T>::quiet_NaN())));
  return select<T>((x > T(0)) & (x < inf), result, special);
}

// ------------------------------------------------------------------ the layer

template <typename T>
struct Layer {
  int64_t n = 0, positions = 0, children = 0, slots = 0, child_types = 0;
  int64_t types = 0, chunks = 0, padded_types = 0, child_positions = 0, iterations = 0;
  const T* windows = nullptr;     // (N, L, I, 16) child poses of every window
  const T* transforms = nullptr;  // (I, K, 4, 4, kLanes) packed transforms, K = chunks
  const T* offsets = nullptr;     // (I, 16) vote offsets, or null
  const T* activations = nullptr; // (N, L, I) child activations per window
  const T* beta_v = nullptr;      // (Cp)
  const T* beta_a = nullptr;      // (Cp)
  const T* prior = nullptr;       // (L, I) routing weights of the first M-step
  const int64_t* slot_child = nullptr;  // (L, S) child position of every window slot (P = padding)
  std::vector<T> inverse_temperature;   // lambda_t per iteration
  std::vector<T> likelihood_scale;      // tau_t of the E-step after each iteration: z = ln(a + eps) + tau ln p
  T cost_factor = 0, variance_floor = 0, epsilon = 0;

  int64_t blocks() const { return n * positions; }
  const T* block_poses(int64_t block) const { return windows + block * children * kEntries; }
  const T* block_activations(int64_t block) const { return activations + block * children; }
  // Lanes of real parent types in a chunk: an all-ones mask, or 0 for the padding types.
  IntVec<T> real_types(int64_t chunk) const {
    IntVec<T> mask{};
    for (int64_t j = 0; j < kLanes; ++j) mask[j] = chunk * kLanes + j < types ? -1 : 0;
    return mask;
  }
};

// Votes of one block and one chunk of parent types: votes[i * 16 + (x*4+z)] over the lanes.
template <typename T>
inline void block_votes(const Layer<T>& g, int64_t block, int64_t chunk, Vec<T>* votes) {
  const T* poses = g.block_poses(block);
  for (int64_t i = 0; i < g.children; ++i) {
    const T* m = poses + i * kEntries;
    const T* w = g.transforms + (i * g.chunks + chunk) * kChunk;  // [y][z][lane]
    Vec<T> rows[kEntries];
    for (int64_t k = 0; k < kEntries; ++k) rows[k] = load(w + k * kLanes);
    Vec<T>* v = votes + i * kEntries;
    for (int64_t x = 0; x < kSide; ++x) {
      for (int64_t z = 0; z < kSide; ++z) {
        Vec<T> acc = g.offsets ? splat(g.offsets[i * kEntries + x * kSide + z]) : Vec<T>{};
        for (int64_t y = 0; y < kSide; ++y) acc += m[x * kSide + y] * rows[y * kSide + z];
        v[x * kSide + z] = acc;
      }
    }
  }
}

// Per-parent statistics of every iteration, laid out [iteration][block][...][Cp].
template <typename T>
struct Stats {
  T* mean = nullptr;          // (T, N*L, 16, Cp)
  T* variance = nullptr;      // (T, N*L, 16, Cp), floor included
  T* activation = nullptr;    // (T, N*L, Cp)
  T* data = nullptr;          // (T, N*L, Cp) R
  T* log_variance = nullptr;  // (T, N*L, Cp) sum_h ln sigma^2
  T* residual = nullptr;      // (T, N*L, 16, Cp) sum_i w (V - mu), as rounded in the variance
  int64_t blocks = 0, padded_types = 0;
  int64_t per_entry(int64_t t, int64_t b, int64_t c) const { return ((t * blocks + b) * kEntries) * padded_types + c; }
  int64_t per_parent(int64_t t, int64_t b, int64_t c) const { return (t * blocks + b) * padded_types + c; }
};

// Subnormal numbers are flushed to zero while the kernel runs on a thread (x86: the MXCSR
// FTZ and DAZ bits, restored afterwards).  Routing weights of far parents underflow
// (exp of a very negative logit), and arithmetic on subnormals costs about a hundred cycles
// per operation; flushing changes results by less than the smallest normal number
// (1.2e-38 in float32).
class FlushSubnormals {
 public:
#if defined(__SSE__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// Ranges of blocks per pass: enough for a few threads to balance their load dynamically, few
// enough that the per-range partial sums of the transforms' gradient stay small.
constexpr int64_t kMaxRanges = 16;

int64_t range_count(int64_t blocks) { return std::max<int64_t>(1, std::min(blocks, kMaxRanges)); }

// Runs f(state, range_index, first_block, end_block) over range_count(blocks) contiguous ranges
// of blocks, each range taken by the next free thread; `make_state()` gives each thread its
// scratch space.
template <typename MakeState, typename F>
void for_block_ranges(int64_t blocks, const MakeState& make_state, const F& f) {
  const int64_t ranges = range_count(blocks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), ranges), 1, [&](int64_t, int64_t) {
    FlushSubnormals flush;
    auto state = make_state();
    for (int64_t r = next.fetch_add(1); r < ranges; r = next.fetch_add(1)) {
      f(state, r, blocks * r / ranges, blocks * (r + 1) / ranges);
    }
  });
}

// ------------------------------------------------------------------ forward

template <typename T>
struct ForwardBuffers {
  T* logits = nullptr;      // (N*L, I, Cp) z of the previous iteration in, of this one out
  T* child_norm = nullptr;  // (N*L, I) per-child log-sum-exp of the previous z, gathered per slot
  T* window_lse = nullptr;  // (N*L, I) log-sum-exp over parent types of this z, per slot
  T* routing = nullptr;     // (T, N*L, I, Cp) routing weights of every iteration, or null
};

// One EM iteration (M-step, and E-step logits unless it is the last) for every block.
template <typename T>
void forward_pass(const Layer<T>& g, int64_t t, const Stats<T>& stats, int64_t stat_slot, const ForwardBuffers<T>& buf) {
  const bool last = t == g.iterations - 1;
  const T lambda = g.inverse_temperature[t];
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t I = g.children, Cp = g.padded_types;
  struct Scratch {
    std::vector<Vec<T>> votes, weights;
    std::vector<T> top, total;
  };
  const auto make_scratch = [&] {
    return Scratch{std::vector<Vec<T>>(I * kEntries), std::vector<Vec<T>>(I), std::vector<T>(I), std::vector<T>(I)};
  };
  for_block_ranges(g.blocks(), make_scratch, [&](Scratch& scratch, int64_t, int64_t first, int64_t end) {
    std::vector<Vec<T>>& votes = scratch.votes;
    std::vector<Vec<T>>& weights = scratch.weights;
    std::vector<T>& top = scratch.top;
    std::vector<T>& total = scratch.total;
    for (int64_t block = first; block < end; ++block) {
      const int64_t l = block % g.positions;
      const T* a_in = g.block_activations(block);
      T* logits = buf.logits + block * I * Cp;
      const T* norm = buf.child_norm + block * I;
      if (!last) {
        std::fill(top.begin(), top.end(), neg_inf);
        std::fill(total.begin(), total.end(), T(0));
      }
      for (int64_t chunk = 0; chunk < g.chunks; ++chunk) {
        const int64_t c0 = chunk * kLanes;
        const IntVec<T> real = g.real_types(chunk);
        block_votes(g, block, chunk, votes.data());
        // Routing weights r, r' = r a_i and data R = sum_i r'.
        Vec<T> data{};
        for (int64_t i = 0; i < I; ++i) {
          const Vec<T> r = t == 0 ? select<T>(real, splat(g.prior[l * I + i]), Vec<T>{})
                                  : vexp<T>(load(logits + i * Cp + c0) - norm[i]);
          if (buf.routing) store(buf.routing + ((t * g.blocks() + block) * I + i) * Cp + c0, r);
          weights[i] = r * a_in[i];
          data += weights[i];
        }
        const Vec<T> scale = T(1) / (data + g.epsilon);
        // Mean mu = sum_i w V with w = r' / (R + eps).
        Vec<T> mean[kEntries] = {};
        for (int64_t i = 0; i < I; ++i) {
          weights[i] *= scale;
          const Vec<T>* v = votes.data() + i * kEntries;
          for (int64_t h = 0; h < kEntries; ++h) mean[h] += weights[i] * v[h];
        }
        // Variance sigma^2 = sum_i w (V - mu)^2 + floor, and the residual sum_i w (V - mu): zero
        // but for rounding (and eps), it enters the gradient of the mean through the variance.
        // Using its rounded value, not its exact value mu (1 - W), keeps the gradient consistent
        // with the rounding of V - mu: with a variance near its floor, d sigma^2 is multiplied by
        // about 1/sigma^2, so a rounding error of mu would otherwise be amplified.
        Vec<T> variance[kEntries] = {}, residual[kEntries] = {};
        for (int64_t i = 0; i < I; ++i) {
          const Vec<T>* v = votes.data() + i * kEntries;
          for (int64_t h = 0; h < kEntries; ++h) {
            const Vec<T> d = v[h] - mean[h];
            const Vec<T> wd = weights[i] * d;
            residual[h] += wd;
            variance[h] += wd * d;
          }
        }
        Vec<T> log_variance{};
        for (int64_t h = 0; h < kEntries; ++h) {
          variance[h] += g.variance_floor;
          log_variance += vlog<T>(variance[h]);
        }
        // Cost and activation a = sigmoid(lambda (beta_a - f R sum_h (beta_v + ln(sigma^2)/2))).
        const Vec<T> cost = g.cost_factor * data * (T(kEntries) * load(g.beta_v + c0) + T(0.5) * log_variance);
        const Vec<T> activation = T(1) / (T(1) + vexp<T>(-lambda * (load(g.beta_a + c0) - cost)));
        for (int64_t h = 0; h < kEntries; ++h) {
          const int64_t at = stats.per_entry(stat_slot, block, c0) + h * Cp;
          store(stats.mean + at, mean[h]);
          store(stats.variance + at, variance[h]);
          store(stats.residual + at, residual[h]);
        }
        const int64_t at = stats.per_parent(stat_slot, block, c0);
        store(stats.activation + at, activation);
        store(stats.data + at, data);
        store(stats.log_variance + at, log_variance);
        if (last) continue;
        // E-step logits z = ln(a + eps) + tau ln p, ln p = -sum_h (V - mu)^2 / (2 sigma^2) - (16 ln 2pi + sum_h ln sigma^2) / 2
        // (-inf for the padding types), and their log-sum-exp over this chunk's types per slot.
        const T tau = g.likelihood_scale[t];
        Vec<T> half_inverse[kEntries];
        for (int64_t h = 0; h < kEntries; ++h) half_inverse[h] = (T(0.5) * tau) / variance[h];
        const Vec<T> base = select<T>(
            real, vlog<T>(activation + g.epsilon) - (T(0.5) * tau) * (T(kEntries * kLog2Pi) + log_variance), splat(neg_inf));
        for (int64_t i = 0; i < I; ++i) {
          const Vec<T>* v = votes.data() + i * kEntries;
          Vec<T> distance{};
          for (int64_t h = 0; h < kEntries; ++h) {
            const Vec<T> d = v[h] - mean[h];
            distance += d * d * half_inverse[h];
          }
          const Vec<T> z = base - distance;
          store(logits + i * Cp + c0, z);
          // Running log-sum-exp over the chunks of parent types.
          const T chunk_top = max_lanes<T>(z);
          if (chunk_top > top[i]) {
            total[i] *= std::exp(top[i] - chunk_top);
            top[i] = chunk_top;
          }
          total[i] += sum_lanes<T>(vexp<T>(z - top[i]));
        }
      }
      if (last) continue;
      T* lse = buf.window_lse + block * I;
      for (int64_t i = 0; i < I; ++i) lse[i] = top[i] + std::log(total[i]);
    }
  });
}

// Per-child log-sum-exp over every window slot that reads the child, gathered back per
// slot; +inf for slots in the zero padding (their routing weights become 0).
template <typename T>
void reduce_child_lse(const Layer<T>& g, const T* window_lse, T* child_norm) {
  const int64_t P = g.child_positions, B = g.child_types, L = g.positions, S = g.slots, I = g.children;
  const T inf = std::numeric_limits<T>::infinity();
  const auto make_scratch = [&] { return std::vector<T>(2 * P * B); };
  for_block_ranges(g.n, make_scratch, [&](std::vector<T>& scratch, int64_t, int64_t begin, int64_t end) {
    T* top = scratch.data();
    T* total = top + P * B;
    for (int64_t n = begin; n < end; ++n) {
      std::fill(top, top + P * B, -inf);
      std::fill(total, total + P * B, T(0));
      const T* lse = window_lse + n * L * I;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t p = g.slot_child[l * S + s];
          if (p >= P) continue;
          for (int64_t b = 0; b < B; ++b) top[p * B + b] = std::max(top[p * B + b], lse[l * I + s * B + b]);
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t p = g.slot_child[l * S + s];
          if (p >= P) continue;
          for (int64_t b = 0; b < B; ++b) total[p * B + b] += std::exp(lse[l * I + s * B + b] - top[p * B + b]);
        }
      }
      for (int64_t k = 0; k < P * B; ++k) top[k] += std::log(total[k]);
      T* norm = child_norm + n * L * I;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t p = g.slot_child[l * S + s];
          for (int64_t b = 0; b < B; ++b) norm[l * I + s * B + b] = p >= P ? inf : top[p * B + b];
        }
      }
    }
  });
}

// Sum of every window slot's value over the slots that read the same child, gathered
// back per slot (0 for padding slots).
template <typename T>
void reduce_child_sum(const Layer<T>& g, const T* per_slot, T* per_child) {
  const int64_t P = g.child_positions, B = g.child_types, L = g.positions, S = g.slots, I = g.children;
  const auto make_scratch = [&] { return std::vector<T>(P * B); };
  for_block_ranges(g.n, make_scratch, [&](std::vector<T>& total, int64_t, int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      std::fill(total.begin(), total.end(), T(0));
      const T* src = per_slot + n * L * I;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t p = g.slot_child[l * S + s];
          if (p >= P) continue;
          for (int64_t b = 0; b < B; ++b) total[p * B + b] += src[l * I + s * B + b];
        }
      }
      T* dst = per_child + n * L * I;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t p = g.slot_child[l * S + s];
          for (int64_t b = 0; b < B; ++b) dst[l * I + s * B + b] = p >= P ? T(0) : total[p * B + b];
        }
      }
    }
  });
}

// ------------------------------------------------------------------ backward

template <typename T>
struct BackwardBuffers {
  const T* routing = nullptr;              // (T, N*L, I, Cp) saved routing weights
  const T* grad_mean_out = nullptr;        // (N*L, 16, Cp)
  const T* grad_activation_out = nullptr;  // (N*L, Cp)
  T* grad_logits = nullptr;       // (T-1, N*L, I, Cp) gradient of every E-step's logits
  T* grad_routing = nullptr;      // (N*L, I, Cp) gradient of the next iteration's routing weights
  T* slot_sum = nullptr;          // (N*L, I) sum over types of r * grad r, per slot
  T* child_sum = nullptr;         // (N*L, I) the same summed over every parent of the child
  T* rows_times_votes = nullptr;  // (T, N*L, 16, Cp) 2 grad sigma^2
  T* rows_plain = nullptr;        // (T, N*L, 16, Cp) grad mu_total
  T* grad_poses = nullptr;        // (N*L, I, 16)
  T* grad_activations = nullptr;  // (N*L, I)
  T* grad_transforms = nullptr;   // (ranges, I, K, 4, 4, kLanes) partial sums
  T* grad_beta_v = nullptr;       // (ranges, Cp) partial sums
  T* grad_beta_a = nullptr;       // (ranges, Cp) partial sums
};

// The votes' gradient of one block and chunk, summed over every iteration's M-step and
// E-step, pushed back to the poses and transforms (in the last backward pass).
//   grad V = sum_t w_t (g_mu_total,t + 2 g_sigma^2_t (V - mu_t)) - sum_t g_z,t (V - mu_t) / sigma^2_t,
// with the deviations V - mu_t formed first (no cancellation when V is close to mu).
template <typename T>
void votes_gradient(const Layer<T>& g, const Stats<T>& stats, const BackwardBuffers<T>& buf, int64_t block,
                    int64_t chunk, const Vec<T>* votes, T* grad_transforms, std::vector<Vec<T>>& rows) {
  const int64_t I = g.children, Cp = g.padded_types, c0 = chunk * kLanes, iterations = g.iterations;
  const int64_t e_steps = iterations - 1;
  // rows, per iteration: mu, g_mu_total, 2 g_sigma^2, 1/sigma^2 (0 without E-step); then
  // 1 / (R + eps) per iteration.
  constexpr int64_t kRows = 4;
  Vec<T>* inverse_data = rows.data() + iterations * kRows * kEntries;
  for (int64_t t = 0; t < iterations; ++t) {
    Vec<T>* row = rows.data() + t * kRows * kEntries;
    const bool e_step = t < e_steps;
    for (int64_t h = 0; h < kEntries; ++h) {
      const int64_t at = stats.per_entry(t, block, c0) + h * Cp;
      row[h] = load(stats.mean + at);
      row[kEntries + h] = load(buf.rows_plain + at);
      row[2 * kEntries + h] = load(buf.rows_times_votes + at);
      row[3 * kEntries + h] = e_step ? T(1) / load(stats.variance + at) : Vec<T>{};
    }
    inverse_data[t] = T(1) / (load(stats.data + stats.per_parent(t, block, c0)) + g.epsilon);
  }
  const T* poses = g.block_poses(block);
  const T* a_in = g.block_activations(block);
  T* grad_poses = buf.grad_poses + block * I * kEntries;
  for (int64_t i = 0; i < I; ++i) {
    const Vec<T>* v = votes + i * kEntries;
    Vec<T> grad_votes[kEntries] = {};
    for (int64_t t = 0; t < iterations; ++t) {
      const Vec<T>* row = rows.data() + t * kRows * kEntries;
      const int64_t at = ((t * g.blocks() + block) * I + i) * Cp + c0;
      const Vec<T> w = load(buf.routing + at) * a_in[i] * inverse_data[t];
      const Vec<T> gz = t < e_steps ? load(buf.grad_logits + at) : Vec<T>{};
      for (int64_t h = 0; h < kEntries; ++h) {
        const Vec<T> d = v[h] - row[h];
        const Vec<T> slope = w * row[2 * kEntries + h] - gz * row[3 * kEntries + h];
        grad_votes[h] += w * row[kEntries + h] + d * slope;
      }
    }
    // V[x,z] = offset + sum_y M[x,y] W[y,z]: grad W[y,z] += sum_x M[x,y] grad V[x,z],
    // grad M[x,y] = sum over types and z of grad V[x,z] W[y,z].
    const T* m = poses + i * kEntries;
    const T* w = g.transforms + (i * g.chunks + chunk) * kChunk;
    T* gw = grad_transforms + (i * g.chunks + chunk) * kChunk;
    for (int64_t y = 0; y < kSide; ++y) {
      for (int64_t z = 0; z < kSide; ++z) {
        Vec<T> acc = load(gw + (y * kSide + z) * kLanes);
        for (int64_t x = 0; x < kSide; ++x) acc += m[x * kSide + y] * grad_votes[x * kSide + z];
        store(gw + (y * kSide + z) * kLanes, acc);
      }
    }
    Vec<T> rows_w[kEntries], acc[kEntries];
    for (int64_t k = 0; k < kEntries; ++k) rows_w[k] = load(w + k * kLanes);
    for (int64_t x = 0; x < kSide; ++x) {
      for (int64_t y = 0; y < kSide; ++y) {
        acc[x * kSide + y] = Vec<T>{};
        for (int64_t z = 0; z < kSide; ++z) acc[x * kSide + y] += grad_votes[x * kSide + z] * rows_w[y * kSide + z];
      }
    }
    T* out = grad_poses + i * kEntries;
    store(out, chunk == 0 ? sum_lanes_of_16<T>(acc) : load(out) + sum_lanes_of_16<T>(acc));
  }
}

// Backward through iteration t (its E-step if any, then its M-step) for every block.
template <typename T>
void backward_pass(const Layer<T>& g, int64_t t, const Stats<T>& stats, const BackwardBuffers<T>& buf) {
  const bool last = t == g.iterations - 1;
  const T lambda = g.inverse_temperature[t];
  const int64_t I = g.children, Cp = g.padded_types;
  const int64_t transform_values = I * g.chunks * kChunk;
  struct Scratch {
    std::vector<Vec<T>> votes, grad_weights, rows;
    std::vector<T> grad_transforms;  // this range's sum, in cache, copied out at the end of the range
  };
  const auto make_scratch = [&] {
    return Scratch{std::vector<Vec<T>>(I * kEntries), std::vector<Vec<T>>(I),
                   std::vector<Vec<T>>(g.iterations * (4 * kEntries + 1)),
                   std::vector<T>(t == 0 ? transform_values : 0)};
  };
  for_block_ranges(g.blocks(), make_scratch, [&](Scratch& scratch, int64_t range, int64_t first, int64_t end) {
    std::vector<Vec<T>>& votes = scratch.votes;
    std::vector<Vec<T>>& grad_weights = scratch.grad_weights;
    std::vector<Vec<T>>& rows = scratch.rows;
    T* grad_beta_v = buf.grad_beta_v + range * Cp;
    T* grad_beta_a = buf.grad_beta_a + range * Cp;
    T* grad_transforms = scratch.grad_transforms.data();
    std::fill(scratch.grad_transforms.begin(), scratch.grad_transforms.end(), T(0));
    for (int64_t block = first; block < end; ++block) {
      const T* a_in = g.block_activations(block);
      T* grad_a_in = buf.grad_activations + block * I;
      T* slot_sum = buf.slot_sum + block * I;
      if (t > 0) std::fill(slot_sum, slot_sum + I, T(0));
      for (int64_t chunk = 0; chunk < g.chunks; ++chunk) {
        const int64_t c0 = chunk * kLanes;
        block_votes(g, block, chunk, votes.data());
        Vec<T> mean[kEntries], inverse[kEntries];
        Vec<T> grad_mean[kEntries] = {}, grad_variance[kEntries] = {}, grad_activation{};
        for (int64_t h = 0; h < kEntries; ++h) {
          const int64_t at = stats.per_entry(t, block, c0) + h * Cp;
          mean[h] = load(stats.mean + at);
          inverse[h] = T(1) / load(stats.variance + at);
        }
        const int64_t parent = stats.per_parent(t, block, c0);
        const Vec<T> activation = load(stats.activation + parent);
        const Vec<T> data = load(stats.data + parent);
        const Vec<T> log_variance = load(stats.log_variance + parent);
        if (last) {
          for (int64_t h = 0; h < kEntries; ++h) grad_mean[h] = load(buf.grad_mean_out + (block * kEntries + h) * Cp + c0);
          grad_activation = load(buf.grad_activation_out + block * Cp + c0);
        } else {
          // E-step: g_z = r' (g_r' - sum over the child's parents of r' g_r'), r' the next routing;
          // z = ln(a + eps) + tau ln p, ln p = -sum_h (V - mu)^2 / (2 sigma^2) - sum_h ln(2 pi sigma^2) / 2:
          // ln(a + eps) sees g_z, the terms of ln p see tau g_z (stored for the votes' gradient).
          const T tau = g.likelihood_scale[t];
          Vec<T> grad_total{}, sum_deviations[kEntries] = {}, sum_squares[kEntries] = {};
          const T* child_sum = buf.child_sum + block * I;
          for (int64_t i = 0; i < I; ++i) {
            const Vec<T> r_next = load(buf.routing + (((t + 1) * g.blocks() + block) * I + i) * Cp + c0);
            const Vec<T> grad_next = load(buf.grad_routing + (block * I + i) * Cp + c0);
            const Vec<T> gz = r_next * (grad_next - child_sum[i]);
            const Vec<T> gp = tau * gz;  // gradient of ln p
            store(buf.grad_logits + ((t * g.blocks() + block) * I + i) * Cp + c0, gp);
            grad_total += gz;
            const Vec<T>* v = votes.data() + i * kEntries;
            for (int64_t h = 0; h < kEntries; ++h) {
              const Vec<T> gpd = gp * (v[h] - mean[h]);
              sum_deviations[h] += gpd;
              sum_squares[h] += gpd * (v[h] - mean[h]);
            }
          }
          grad_activation = grad_total / (activation + g.epsilon);
          const Vec<T> grad_log_p_total = tau * grad_total;
          for (int64_t h = 0; h < kEntries; ++h) {
            grad_mean[h] = sum_deviations[h] * inverse[h];
            grad_variance[h] = (T(0.5) * sum_squares[h] * inverse[h] - T(0.5) * grad_log_p_total) * inverse[h];
          }
        }
        // M-step: a = sigmoid(lambda (beta_a - cost)), cost = f R sum_h (beta_v + ln(sigma^2)/2).
        const Vec<T> grad_pre = grad_activation * activation * (T(1) - activation) * lambda;
        const Vec<T> grad_cost = -grad_pre * g.cost_factor;
        const Vec<T> grad_data = grad_cost * (T(kEntries) * load(g.beta_v + c0) + T(0.5) * log_variance);
        store(grad_beta_a + c0, load(grad_beta_a + c0) + grad_pre);
        store(grad_beta_v + c0, load(grad_beta_v + c0) + grad_cost * data * T(kEntries));
        const Vec<T> grad_cost_half = T(0.5) * grad_cost * data;
        const Vec<T> inverse_data = T(1) / (data + g.epsilon);
        const Vec<T> complement = g.epsilon * inverse_data;  // 1 - W, W = R / (R + eps)
        // g_mu_total = g_mu - 2 g_sigma^2 sum_i w (V - mu) (the residual, as rounded in the forward pass).
        Vec<T> grad_mean_total[kEntries], shift{};
        for (int64_t h = 0; h < kEntries; ++h) {
          const int64_t at = stats.per_entry(t, block, c0) + h * Cp;
          grad_variance[h] += grad_cost_half * inverse[h];
          grad_mean_total[h] = grad_mean[h] - T(2) * grad_variance[h] * load(stats.residual + at);
          store(buf.rows_times_votes + at, T(2) * grad_variance[h]);
          store(buf.rows_plain + at, grad_mean_total[h]);
          shift += grad_mean_total[h] * mean[h];
        }
        // g_w_i = sum_h (g_mu_total V + g_sigma^2 (V - mu)^2), computed centred as g_w_i - c with
        // c = sum_h g_mu_total mu (no cancellation when V is close to mu):
        // g_r'_i = (g_w_i - sum_k w_k g_w_k) / (R + eps) + g_R = (g_w_i - c - S' + c (1 - W)) / (R + eps) + g_R,
        // S' = sum_k w_k (g_w_k - c).
        Vec<T> weighted_total{};
        for (int64_t i = 0; i < I; ++i) {
          const Vec<T>* v = votes.data() + i * kEntries;
          const Vec<T> r = load(buf.routing + ((t * g.blocks() + block) * I + i) * Cp + c0);
          Vec<T> gw{};
          for (int64_t h = 0; h < kEntries; ++h) {
            const Vec<T> d = v[h] - mean[h];
            gw += (grad_mean_total[h] + grad_variance[h] * d) * d;
          }
          grad_weights[i] = gw;
          weighted_total += gw * r * a_in[i] * inverse_data;
        }
        // g_a_in += sum over types of g_r' r;  g_r = g_r' a_in.
        const Vec<T> offset = shift * complement - weighted_total;
        for (int64_t i = 0; i < I; ++i) {
          const int64_t at = ((t * g.blocks() + block) * I + i) * Cp + c0;
          const Vec<T> r = load(buf.routing + at);
          const Vec<T> grad_weighted = (grad_weights[i] + offset) * inverse_data + grad_data;
          grad_a_in[i] += sum_lanes<T>(grad_weighted * r);
          if (t > 0) {
            const Vec<T> grad_routing = grad_weighted * a_in[i];
            store(buf.grad_routing + (block * I + i) * Cp + c0, grad_routing);
            slot_sum[i] += sum_lanes<T>(r * grad_routing);
          }
        }
        if (t == 0) votes_gradient(g, stats, buf, block, chunk, votes.data(), grad_transforms, rows);
      }
    }
    if (t == 0) std::copy(grad_transforms, grad_transforms + transform_values, buf.grad_transforms + range * transform_values);
  });
}

// ------------------------------------------------------------------ Python entry points


template <typename T>
Layer<T> make_layer(const torch::Tensor& windows, const torch::Tensor& transforms, const c10::optional<torch::Tensor>& offsets,
                    const torch::Tensor& activations, const torch::Tensor& beta_v, const torch::Tensor& beta_a,
                    const torch::Tensor& prior, const torch::Tensor& slot_child, int64_t child_positions, int64_t types,
                    const std::vector<double>& inverse_temperature, const std::vector<double>& likelihood_scale,
                    double cost_factor, double variance_floor, double epsilon) {
  Layer<T> g;
  g.n = windows.size(0);
  g.positions = windows.size(1);
  g.children = windows.size(2);
  g.slots = slot_child.size(1);
  g.child_types = g.children / g.slots;
  g.chunks = transforms.size(1);
  g.padded_types = g.chunks * kLanes;
  g.types = types;
  g.child_positions = child_positions;
  g.iterations = static_cast<int64_t>(inverse_temperature.size());
  g.windows = windows.data_ptr<T>();
  g.transforms = transforms.data_ptr<T>();
  g.offsets = offsets.has_value() && offsets->defined() ? offsets->data_ptr<T>() : nullptr;
  g.activations = activations.data_ptr<T>();
  g.beta_v = beta_v.data_ptr<T>();
  g.beta_a = beta_a.data_ptr<T>();
  g.prior = prior.data_ptr<T>();
  g.slot_child = slot_child.data_ptr<int64_t>();
  for (double v : inverse_temperature) g.inverse_temperature.push_back(static_cast<T>(v));
  TORCH_CHECK(likelihood_scale.size() == inverse_temperature.size(), "one likelihood scale per iteration");
  for (double v : likelihood_scale) g.likelihood_scale.push_back(static_cast<T>(v));
  g.cost_factor = static_cast<T>(cost_factor);
  g.variance_floor = static_cast<T>(variance_floor);
  g.epsilon = static_cast<T>(epsilon);
  return g;
}

void check_inputs(const torch::Tensor& windows, const torch::Tensor& transforms, const c10::optional<torch::Tensor>& offsets,
                  const torch::Tensor& activations, const torch::Tensor& beta_v, const torch::Tensor& beta_a,
                  const torch::Tensor& prior, const torch::Tensor& slot_child, int64_t types) {
  TORCH_CHECK(windows.dim() == 4 && windows.size(3) == kEntries, "windows must be (N, L, I, 16)");
  const int64_t L = windows.size(1), I = windows.size(2);
  TORCH_CHECK(transforms.dim() == 5 && transforms.size(0) == I && transforms.size(2) == kSide &&
                  transforms.size(3) == kSide && transforms.size(4) == kLanes,
              "transforms must be (I, K, 4, 4, 16)");
  const int64_t Cp = transforms.size(1) * kLanes;
  TORCH_CHECK(types >= 1 && types <= Cp, "parent types do not fit the packed transforms");
  TORCH_CHECK(slot_child.dim() == 2 && slot_child.size(0) == L && I % slot_child.size(1) == 0,
              "slot_child must be (L, S) with S dividing I");
  TORCH_CHECK(slot_child.scalar_type() == torch::kInt64, "slot_child must be int64");
  TORCH_CHECK(activations.sizes() == torch::IntArrayRef({windows.size(0), L, I}), "activations must be (N, L, I)");
  TORCH_CHECK(beta_v.numel() == Cp && beta_a.numel() == Cp, "betas must be padded to the packed types");
  TORCH_CHECK(prior.sizes() == torch::IntArrayRef({L, I}), "prior must be (L, I)");
  for (const torch::Tensor* t : {&windows, &transforms, &activations, &beta_v, &beta_a, &prior, &slot_child}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "inputs must be contiguous CPU tensors");
  }
  for (const torch::Tensor* t : {&transforms, &activations, &beta_v, &beta_a, &prior}) {
    TORCH_CHECK(t->scalar_type() == windows.scalar_type(), "inputs must share one dtype");
  }
  if (offsets.has_value() && offsets->defined()) {
    TORCH_CHECK(offsets->sizes() == torch::IntArrayRef({I, kEntries}) && offsets->is_contiguous() &&
                    offsets->scalar_type() == windows.scalar_type(),
                "offsets must be contiguous (I, 16) of the inputs' dtype");
  }
}


// Returns [mean (N, L, 16, Cp), activations (N, L, Cp)] and, with save, the saved state
// [routing (T, N, L, I, Cp), means, variances (T, N, L, 16, Cp), activations, data, log variances (T, N, L, Cp),
// residuals (T, N, L, 16, Cp)].
std::vector<torch::Tensor> forward(const torch::Tensor& windows, const torch::Tensor& transforms,
                                   const c10::optional<torch::Tensor>& offsets, const torch::Tensor& activations,
                                   const torch::Tensor& beta_v, const torch::Tensor& beta_a, const torch::Tensor& prior,
                                   const torch::Tensor& slot_child, int64_t child_positions, int64_t types,
                                   const std::vector<double>& inverse_temperature,
                                   const std::vector<double>& likelihood_scale, double cost_factor,
                                   double variance_floor, double epsilon, bool save) {
  check_inputs(windows, transforms, offsets, activations, beta_v, beta_a, prior, slot_child, types);
  TORCH_CHECK(!inverse_temperature.empty(), "at least one iteration");
  const int64_t N = windows.size(0), L = windows.size(1), I = windows.size(2), Cp = transforms.size(1) * kLanes;
  const int64_t T_it = static_cast<int64_t>(inverse_temperature.size());
  const int64_t slots_kept = save ? T_it : 1;
  auto options = windows.options();
  torch::Tensor means = torch::empty({slots_kept, N, L, kEntries, Cp}, options);
  torch::Tensor variances = torch::empty({slots_kept, N, L, kEntries, Cp}, options);
  torch::Tensor acts = torch::empty({slots_kept, N, L, Cp}, options);
  torch::Tensor data = torch::empty({slots_kept, N, L, Cp}, options);
  torch::Tensor log_variances = torch::empty({slots_kept, N, L, Cp}, options);
  torch::Tensor residuals = torch::empty({slots_kept, N, L, kEntries, Cp}, options);
  torch::Tensor routing = save ? torch::empty({T_it, N, L, I, Cp}, options) : torch::Tensor();
  torch::Tensor logits = T_it > 1 ? torch::empty({N, L, I, Cp}, options) : torch::Tensor();
  torch::Tensor child_norm = T_it > 1 ? torch::empty({N, L, I}, options) : torch::Tensor();
  torch::Tensor window_lse = T_it > 1 ? torch::empty({N, L, I}, options) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(windows.scalar_type(), "blocked_routing_forward", [&] {
    pybind11::gil_scoped_release no_gil;
    Layer<scalar_t> g = make_layer<scalar_t>(windows, transforms, offsets, activations, beta_v, beta_a, prior,
                                             slot_child, child_positions, types, inverse_temperature,
                                             likelihood_scale, cost_factor, variance_floor, epsilon);
    Stats<scalar_t> stats{means.data_ptr<scalar_t>(), variances.data_ptr<scalar_t>(), acts.data_ptr<scalar_t>(),
                          data.data_ptr<scalar_t>(), log_variances.data_ptr<scalar_t>(), residuals.data_ptr<scalar_t>(),
                          g.blocks(), Cp};
    ForwardBuffers<scalar_t> buf;
    if (T_it > 1) {
      buf.logits = logits.data_ptr<scalar_t>();
      buf.child_norm = child_norm.data_ptr<scalar_t>();
      buf.window_lse = window_lse.data_ptr<scalar_t>();
    }
    buf.routing = save ? routing.data_ptr<scalar_t>() : nullptr;
    for (int64_t t = 0; t < T_it; ++t) {
      forward_pass(g, t, stats, save ? t : 0, buf);
      if (t < T_it - 1) reduce_child_lse(g, buf.window_lse, buf.child_norm);
    }
  });
  const int64_t final_slot = slots_kept - 1;
  std::vector<torch::Tensor> result{means[final_slot].clone(), acts[final_slot].clone()};
  if (save) {
    for (const torch::Tensor& t : {routing, means, variances, acts, data, log_variances, residuals}) result.push_back(t);
  }
  return result;
}

// Returns [grad windows (N, L, I, 16), grad transforms (I, K, 4, 4, 16), grad activations (N, L, I),
// grad beta_v (Cp), grad beta_a (Cp)].
std::vector<torch::Tensor> backward(const torch::Tensor& windows, const torch::Tensor& transforms,
                                    const c10::optional<torch::Tensor>& offsets, const torch::Tensor& activations,
                                    const torch::Tensor& beta_v, const torch::Tensor& beta_a, const torch::Tensor& prior,
                                    const torch::Tensor& slot_child, int64_t child_positions, int64_t types,
                                    const std::vector<double>& inverse_temperature,
                                    const std::vector<double>& likelihood_scale, double cost_factor,
                                    double variance_floor, double epsilon, const torch::Tensor& routing,
                                    const torch::Tensor& means, const torch::Tensor& variances, const torch::Tensor& acts,
                                    const torch::Tensor& data, const torch::Tensor& log_variances,
                                    const torch::Tensor& residuals, const torch::Tensor& grad_mean, const torch::Tensor& grad_activation) {
  check_inputs(windows, transforms, offsets, activations, beta_v, beta_a, prior, slot_child, types);
  const int64_t N = windows.size(0), L = windows.size(1), I = windows.size(2), K = transforms.size(1), Cp = K * kLanes;
  const int64_t T_it = static_cast<int64_t>(inverse_temperature.size());
  TORCH_CHECK(routing.sizes() == torch::IntArrayRef({T_it, N, L, I, Cp}), "saved routing has the wrong shape");
  TORCH_CHECK(grad_mean.sizes() == torch::IntArrayRef({N, L, kEntries, Cp}) && grad_mean.is_contiguous(),
              "grad_mean must be contiguous (N, L, 16, Cp)");
  TORCH_CHECK(grad_activation.sizes() == torch::IntArrayRef({N, L, Cp}) && grad_activation.is_contiguous(),
              "grad_activation must be contiguous (N, L, Cp)");
  auto options = windows.options();
  const int64_t ranges = range_count(N * L);
  torch::Tensor grad_logits = torch::empty({std::max<int64_t>(T_it - 1, 1), N, L, I, Cp}, options);
  torch::Tensor grad_routing = torch::empty({N, L, I, Cp}, options);
  torch::Tensor slot_sum = torch::empty({N, L, I}, options);
  torch::Tensor child_sum = torch::empty({N, L, I}, options);
  torch::Tensor rows_times = torch::empty({T_it, N, L, kEntries, Cp}, options);
  torch::Tensor rows_plain = torch::empty({T_it, N, L, kEntries, Cp}, options);
  torch::Tensor grad_windows = torch::empty({N, L, I, kEntries}, options);  // written by the last pass
  torch::Tensor grad_activations = torch::zeros({N, L, I}, options);
  torch::Tensor grad_transforms = torch::empty({ranges, I, K, kSide, kSide, kLanes}, options);  // one sum per range
  torch::Tensor grad_beta_v = torch::zeros({ranges, Cp}, options);
  torch::Tensor grad_beta_a = torch::zeros({ranges, Cp}, options);
  AT_DISPATCH_FLOATING_TYPES(windows.scalar_type(), "blocked_routing_backward", [&] {
    pybind11::gil_scoped_release no_gil;
    Layer<scalar_t> g = make_layer<scalar_t>(windows, transforms, offsets, activations, beta_v, beta_a, prior,
                                             slot_child, child_positions, types, inverse_temperature,
                                             likelihood_scale, cost_factor, variance_floor, epsilon);
    Stats<scalar_t> stats{means.data_ptr<scalar_t>(), variances.data_ptr<scalar_t>(), acts.data_ptr<scalar_t>(),
                          data.data_ptr<scalar_t>(), log_variances.data_ptr<scalar_t>(), residuals.data_ptr<scalar_t>(),
                          g.blocks(), Cp};
    BackwardBuffers<scalar_t> buf;
    buf.routing = routing.data_ptr<scalar_t>();
    buf.grad_mean_out = grad_mean.data_ptr<scalar_t>();
    buf.grad_activation_out = grad_activation.data_ptr<scalar_t>();
    buf.grad_logits = grad_logits.data_ptr<scalar_t>();
    buf.grad_routing = grad_routing.data_ptr<scalar_t>();
    buf.slot_sum = slot_sum.data_ptr<scalar_t>();
    buf.child_sum = child_sum.data_ptr<scalar_t>();
    buf.rows_times_votes = rows_times.data_ptr<scalar_t>();
    buf.rows_plain = rows_plain.data_ptr<scalar_t>();
    buf.grad_poses = grad_windows.data_ptr<scalar_t>();
    buf.grad_activations = grad_activations.data_ptr<scalar_t>();
    buf.grad_transforms = grad_transforms.data_ptr<scalar_t>();
    buf.grad_beta_v = grad_beta_v.data_ptr<scalar_t>();
    buf.grad_beta_a = grad_beta_a.data_ptr<scalar_t>();
    for (int64_t t = T_it - 1; t >= 0; --t) {
      backward_pass(g, t, stats, buf);
      if (t > 0) reduce_child_sum(g, buf.slot_sum, buf.child_sum);
    }
  });
  return {grad_windows, grad_transforms.sum(0), grad_activations, grad_beta_v.sum(0), grad_beta_a.sum(0)};
}

}  // namespace matcaps_blocked

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &matcaps_blocked::forward, "Blocked EM routing, forward pass");
  m.def("backward", &matcaps_blocked::backward, "Blocked EM routing, backward pass");
}
