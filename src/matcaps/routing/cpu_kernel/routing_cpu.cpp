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
// lanes; the only horizontal reductions are per (block, child).  Threads: at::parallel_for
// over contiguous ranges of blocks, one partial sum per range for the parameter gradients
// (summed in a fixed order, so results do not depend on scheduling).
//
// Equations and their gradients: see the module docstring of matcaps/routing/fused.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace matcaps_blocked {

constexpr int64_t kSide = 4;      // poses are 4x4 matrices
constexpr int64_t kEntries = 16;  // H, pose entries
constexpr int64_t kLanes = 16;    // parent types per vector chunk
constexpr int64_t kChunk = kEntries * kLanes;  // values of one child's votes in one chunk
constexpr double kLog2Pi = 1.8378770664093453;

// ------------------------------------------------------------------ vectorisable exp and log
// Plain arithmetic and bit operations only, so that `omp simd` loops calling them vectorise.

template <typename T> struct FloatBits;
template <> struct FloatBits<float> {
  using Int = int32_t;
  static constexpr int kMantissa = 23;
  static constexpr Int kBias = 127;
};
template <> struct FloatBits<double> {
  using Int = int64_t;
  static constexpr int kMantissa = 52;
  static constexpr Int kBias = 1023;
};

template <typename T>
inline T power_of_two(typename FloatBits<T>::Int e) {  // 2^e, e in the normal exponent range
  using Int = typename FloatBits<T>::Int;
  return __builtin_bit_cast(T, static_cast<Int>((e + FloatBits<T>::kBias) << FloatBits<T>::kMantissa));
}

// exp(x) to about 1 ulp: x = n ln2 + r, |r| <= ln2/2, Taylor polynomial of r (degree 7 for
// float, 13 for double: truncation below half an ulp), scaled by 2^n in two steps so that
// subnormal results are rounded gradually.
template <typename T>
inline T fast_exp(T x) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  using Int = typename FloatBits<T>::Int;
  const T max_x = kFloat ? T(88.72283) : T(709.782712893384);
  const T min_x = kFloat ? T(-103.97208) : T(-745.1332191019412);
  const T ln2_hi = kFloat ? T(0.693359375) : T(6.93145751953125e-1);
  const T ln2_lo = kFloat ? T(-2.12194440e-4) : T(1.42860682030941723212e-6);
  T clamped = x < min_x ? min_x : (x > max_x ? max_x : x);
  T n = std::floor(clamped * T(1.4426950408889634) + T(0.5));
  T r = clamped - n * ln2_hi - n * ln2_lo;
  T p;
  if constexpr (kFloat) {
    p = T(1.0 / 5040);
    p = p * r + T(1.0 / 720);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  } else {
    p = T(1.0 / 6227020800.0);
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
  Int exponent = static_cast<Int>(n);
  Int half = exponent >> 1;
  T result = p * power_of_two<T>(half) * power_of_two<T>(exponent - half);
  result = x > max_x ? std::numeric_limits<T>::infinity() : result;
  result = x < min_x ? T(0) : result;
  return x != x ? x : result;  // NaN stays NaN
}

// ln(x) to about 1 ulp: x = 2^e m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s),
// s = (m - 1)/(m + 1), |s| <= 0.1716, odd series of s (to s^9 for float, s^21 for double).
template <typename T>
inline T fast_log(T x) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  using Int = typename FloatBits<T>::Int;
  constexpr int kMantissa = FloatBits<T>::kMantissa;
  const T ln2_hi = kFloat ? T(0.693359375) : T(6.93145751953125e-1);
  const T ln2_lo = kFloat ? T(-2.12194440e-4) : T(1.42860682030941723212e-6);
  const bool subnormal = x < std::numeric_limits<T>::min();
  const T scaled = subnormal ? x * T(Int(1) << kMantissa) : x;
  const Int bits = __builtin_bit_cast(Int, scaled);
  Int exponent = ((bits >> kMantissa) & ((Int(1) << (sizeof(T) * 8 - 1 - kMantissa)) - 1)) - FloatBits<T>::kBias;
  exponent = subnormal ? exponent - kMantissa : exponent;
  T m = __builtin_bit_cast(T, static_cast<Int>((bits & ((Int(1) << kMantissa) - 1)) | (FloatBits<T>::kBias << kMantissa)));
  const bool above = m > T(1.4142135623730951);
  m = above ? m * T(0.5) : m;
  exponent = above ? exponent + 1 : exponent;
  const T f = m - T(1);
  const T s = f / (T(2) + f);
  const T s2 = s * s;
  T p;
  if constexpr (kFloat) {
    p = T(1.0 / 9);
    p = p * s2 + T(1.0 / 7);
    p = p * s2 + T(1.0 / 5);
    p = p * s2 + T(1.0 / 3);
    p = p * s2 + T(1);
  } else {
    p = T(1.0 / 21);
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
  const T e = static_cast<T>(exponent);
  const T result = e * ln2_hi + (T(2) * s * p + e * ln2_lo);
  const T inf = std::numeric_limits<T>::infinity();
  const T special = x == T(0) ? -inf : (x == inf ? inf : std::numeric_limits<T>::quiet_NaN());
  return (x > T(0) && x < inf) ? result : special;
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
  T cost_factor = 0, variance_floor = 0, epsilon = 0;

  int64_t blocks() const { return n * positions; }
  const T* block_poses(int64_t block) const { return windows + block * children * kEntries; }
  const T* block_activations(int64_t block) const { return activations + block * children; }
};

// Votes of one block and one chunk of parent types: V[i][x*4+z][lane].
template <typename T>
inline void block_votes(const Layer<T>& g, int64_t block, int64_t chunk, T* votes) {
  const T* poses = g.block_poses(block);
  for (int64_t i = 0; i < g.children; ++i) {
    const T* m = poses + i * kEntries;
    const T* w = g.transforms + (i * g.chunks + chunk) * kChunk;  // [y][z][lane]
    T* v = votes + i * kChunk;
    for (int64_t x = 0; x < kSide; ++x) {
      for (int64_t z = 0; z < kSide; ++z) {
        const T offset = g.offsets ? g.offsets[i * kEntries + x * kSide + z] : T(0);
        T acc[kLanes];
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) acc[j] = offset;
        for (int64_t y = 0; y < kSide; ++y) {
          const T a = m[x * kSide + y];
          const T* wr = w + (y * kSide + z) * kLanes;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) acc[j] += a * wr[j];
        }
        T* out = v + (x * kSide + z) * kLanes;
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) out[j] = acc[j];
      }
    }
  }
}

// Per-parent statistics of one iteration, laid out [iteration][block][...][Cp].
template <typename T>
struct Stats {
  T* mean = nullptr;      // (T, N*L, 16, Cp)
  T* variance = nullptr;  // (T, N*L, 16, Cp), floor included
  T* activation = nullptr;  // (T, N*L, Cp)
  T* data = nullptr;      // (T, N*L, Cp) R
  T* log_variance = nullptr;  // (T, N*L, Cp) sum_h ln sigma^2
  T* residual = nullptr;  // (T, N*L, 16, Cp) sum_i w (V - mu), as rounded in the variance
  int64_t blocks = 0, padded_types = 0;
  T* mean_at(int64_t t, int64_t b, int64_t c) const { return mean + ((t * blocks + b) * kEntries) * padded_types + c; }
  T* variance_at(int64_t t, int64_t b, int64_t c) const { return variance + ((t * blocks + b) * kEntries) * padded_types + c; }
  T* activation_at(int64_t t, int64_t b, int64_t c) const { return activation + (t * blocks + b) * padded_types + c; }
  T* data_at(int64_t t, int64_t b, int64_t c) const { return data + (t * blocks + b) * padded_types + c; }
  T* log_variance_at(int64_t t, int64_t b, int64_t c) const { return log_variance + (t * blocks + b) * padded_types + c; }
  T* residual_at(int64_t t, int64_t b, int64_t c) const { return residual + ((t * blocks + b) * kEntries) * padded_types + c; }
};

// Runs f(range_index, first_block, end_block) over `ranges` contiguous ranges of blocks.
template <typename F>
void for_block_ranges(int64_t blocks, int64_t ranges, const F& f) {
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r, blocks * r / ranges, blocks * (r + 1) / ranges);
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
void forward_pass(const Layer<T>& g, int64_t t, const Stats<T>& stats, int64_t stat_slot, const ForwardBuffers<T>& buf,
                  int64_t ranges) {
  const bool last = t == g.iterations - 1;
  const T lambda = g.inverse_temperature[t];
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t I = g.children, Cp = g.padded_types;
  for_block_ranges(g.blocks(), ranges, [&](int64_t, int64_t first, int64_t end) {
    std::vector<T> votes(I * kChunk), weights(I * kLanes);
    for (int64_t block = first; block < end; ++block) {
      const int64_t l = block % g.positions;
      const T* a_in = g.block_activations(block);
      T* logits = buf.logits + block * I * Cp;
      const T* norm = buf.child_norm + block * I;
      for (int64_t chunk = 0; chunk < g.chunks; ++chunk) {
        const int64_t c0 = chunk * kLanes;
        block_votes(g, block, chunk, votes.data());
        // Routing weights r and data R = sum_i r a_i.
        T data[kLanes] = {};
        for (int64_t i = 0; i < I; ++i) {
          T r[kLanes];
          if (t == 0) {
            const T p = g.prior[l * I + i];
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) r[j] = c0 + j < g.types ? p : T(0);
          } else {
            const T* z = logits + i * Cp + c0;
            const T shift = norm[i];
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) r[j] = fast_exp(z[j] - shift);
          }
          if (buf.routing) {
            T* out = buf.routing + ((t * g.blocks() + block) * I + i) * Cp + c0;
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) out[j] = r[j];
          }
          const T a = a_in[i];
          T* w = weights.data() + i * kLanes;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) {
            w[j] = r[j] * a;
            data[j] += w[j];
          }
        }
        T scale[kLanes];
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) scale[j] = T(1) / (data[j] + g.epsilon);
        // Mean mu = sum_i w V.
        T mean[kEntries][kLanes] = {};
        for (int64_t i = 0; i < I; ++i) {
          T* w = weights.data() + i * kLanes;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) w[j] *= scale[j];
          const T* v = votes.data() + i * kChunk;
          for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) mean[h][j] += w[j] * v[h * kLanes + j];
          }
        }
        // Variance sigma^2 = sum_i w (V - mu)^2 + floor, and the residual sum_i w (V - mu): zero
        // but for rounding (and eps), it enters the gradient of the mean through the variance.
        // Using the rounded value, not its exact value mu (1 - W), keeps the gradient consistent
        // with the rounding of V - mu: with a variance near its floor, d sigma^2 is multiplied by
        // about 1/sigma^2, so a rounding error of mu would otherwise be amplified.
        T variance[kEntries][kLanes] = {}, residual[kEntries][kLanes] = {};
        for (int64_t i = 0; i < I; ++i) {
          const T* w = weights.data() + i * kLanes;
          const T* v = votes.data() + i * kChunk;
          for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) {
              const T d = v[h * kLanes + j] - mean[h][j];
              residual[h][j] += w[j] * d;
              variance[h][j] += w[j] * d * d;
            }
          }
        }
        T log_variance[kLanes] = {};
        for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) {
            variance[h][j] += g.variance_floor;
            log_variance[j] += fast_log(variance[h][j]);
          }
        }
        // Cost and activation a = sigmoid(lambda (beta_a - f R sum_h (beta_v + ln(sigma^2)/2))).
        T activation[kLanes];
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const T cost = g.cost_factor * data[j] * (T(kEntries) * g.beta_v[c0 + j] + T(0.5) * log_variance[j]);
          activation[j] = T(1) / (T(1) + fast_exp(-lambda * (g.beta_a[c0 + j] - cost)));
        }
        T* mean_out = stats.mean_at(stat_slot, block, c0);
        T* variance_out = stats.variance_at(stat_slot, block, c0);
        T* residual_out = stats.residual_at(stat_slot, block, c0);
        for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) {
            mean_out[h * Cp + j] = mean[h][j];
            variance_out[h * Cp + j] = variance[h][j];
            residual_out[h * Cp + j] = residual[h][j];
          }
        }
        T* activation_out = stats.activation_at(stat_slot, block, c0);
        T* data_out = stats.data_at(stat_slot, block, c0);
        T* log_variance_out = stats.log_variance_at(stat_slot, block, c0);
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          activation_out[j] = activation[j];
          data_out[j] = data[j];
          log_variance_out[j] = log_variance[j];
        }
        if (last) continue;
        // E-step logits z = ln(a + eps) - sum_h (V - mu)^2 / (2 sigma^2) - (16 ln 2pi + sum_h ln sigma^2) / 2.
        T inverse[kEntries][kLanes], base[kLanes];
        for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) inverse[h][j] = T(0.5) / variance[h][j];
        }
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          base[j] = c0 + j < g.types
                        ? fast_log(activation[j] + g.epsilon) - T(0.5) * (T(kEntries * kLog2Pi) + log_variance[j])
                        : neg_inf;
        }
        for (int64_t i = 0; i < I; ++i) {
          const T* v = votes.data() + i * kChunk;
          T distance[kLanes] = {};
          for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) {
              const T d = v[h * kLanes + j] - mean[h][j];
              distance[j] += d * d * inverse[h][j];
            }
          }
          T* z = logits + i * Cp + c0;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) z[j] = base[j] - distance[j];
        }
      }
      if (last) continue;
      // Log-sum-exp over the parent types of each slot of the window.
      T* lse = buf.window_lse + block * I;
      for (int64_t i = 0; i < I; ++i) {
        const T* z = logits + i * Cp;
        T top = neg_inf;
#pragma omp simd reduction(max : top)
        for (int64_t c = 0; c < g.types; ++c) top = std::max(top, z[c]);
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t c = 0; c < g.types; ++c) total += fast_exp(z[c] - top);
        lse[i] = top + fast_log(total);
      }
    }
  });
}

// Per-child log-sum-exp over every window slot that reads the child, gathered back per
// slot; +inf for slots in the zero padding (their routing weights become 0).
template <typename T>
void reduce_child_lse(const Layer<T>& g, const T* window_lse, T* child_norm) {
  const int64_t P = g.child_positions, B = g.child_types, L = g.positions, S = g.slots, I = g.children;
  const T inf = std::numeric_limits<T>::infinity();
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> top(P * B), total(P * B);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(top.begin(), top.end(), -inf);
      std::fill(total.begin(), total.end(), T(0));
      const T* lse = window_lse + n * L * I;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t p = g.slot_child[l * S + s];
          if (p >= P) continue;
          const T* src = lse + l * I + s * B;
          T* dst = top.data() + p * B;
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) dst[b] = std::max(dst[b], src[b]);
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t p = g.slot_child[l * S + s];
          if (p >= P) continue;
          const T* src = lse + l * I + s * B;
          const T* m = top.data() + p * B;
          T* dst = total.data() + p * B;
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) dst[b] += fast_exp(src[b] - m[b]);
        }
      }
#pragma omp simd
      for (int64_t k = 0; k < P * B; ++k) top[k] += fast_log(total[k]);
      T* norm = child_norm + n * L * I;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t p = g.slot_child[l * S + s];
          T* dst = norm + l * I + s * B;
          for (int64_t b = 0; b < B; ++b) dst[b] = p >= P ? inf : top[p * B + b];
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
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> total(P * B);
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
  const T* routing = nullptr;     // (T, N*L, I, Cp) saved routing weights
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
// E-step, pushed back to the poses and transforms (the last backward pass).
template <typename T>
void votes_gradient(const Layer<T>& g, const Stats<T>& stats, const BackwardBuffers<T>& buf, int64_t block,
                    int64_t chunk, const T* votes, T* grad_transforms, std::vector<T>& rows) {
  const int64_t I = g.children, Cp = g.padded_types, c0 = chunk * kLanes, iterations = g.iterations;
  const int64_t e_steps = iterations - 1;
  // rows, per iteration: mu, g_mu_total, 2 g_sigma^2, 1/sigma^2 (0 without E-step), then
  // 1 / (R + eps) per iteration.
  constexpr int64_t kRows = 4;
  T* inverse_data = rows.data() + iterations * kRows * kChunk;
  for (int64_t t = 0; t < iterations; ++t) {
    T* row = rows.data() + t * kRows * kChunk;
    const T* mean = stats.mean_at(t, block, c0);
    const T* variance = stats.variance_at(t, block, c0);
    const T* plain = buf.rows_plain + ((t * g.blocks() + block) * kEntries) * Cp + c0;
    const T* times = buf.rows_times_votes + ((t * g.blocks() + block) * kEntries) * Cp + c0;
    const bool e_step = t < e_steps;
    for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        row[h * kLanes + j] = mean[h * Cp + j];
        row[kChunk + h * kLanes + j] = plain[h * Cp + j];
        row[2 * kChunk + h * kLanes + j] = times[h * Cp + j];
        row[3 * kChunk + h * kLanes + j] = e_step ? T(1) / variance[h * Cp + j] : T(0);
      }
    }
    const T* data = stats.data_at(t, block, c0);
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) inverse_data[t * kLanes + j] = T(1) / (data[j] + g.epsilon);
  }
  const T* poses = g.block_poses(block);
  const T* a_in = g.block_activations(block);
  T* grad_poses = buf.grad_poses + block * I * kEntries;
  for (int64_t i = 0; i < I; ++i) {
    // grad V = sum_t w_t (g_mu_total + 2 g_sigma^2 (V - mu_t)) - sum_t g_z,t (V - mu_t) / sigma^2_t,
    // with the deviations V - mu_t formed first (no cancellation when V is close to mu).
    const T* v = votes + i * kChunk;
    T grad_votes[kEntries][kLanes] = {};
    for (int64_t t = 0; t < iterations; ++t) {
      const T* row = rows.data() + t * kRows * kChunk;
      const T* r = buf.routing + ((t * g.blocks() + block) * I + i) * Cp + c0;
      const T* gz_in = t < e_steps ? buf.grad_logits + ((t * g.blocks() + block) * I + i) * Cp + c0 : nullptr;
      T w[kLanes], gz[kLanes];
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        w[j] = r[j] * a_in[i] * inverse_data[t * kLanes + j];
        gz[j] = gz_in ? gz_in[j] : T(0);
      }
      for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const T d = v[h * kLanes + j] - row[h * kLanes + j];
          const T slope = w[j] * row[2 * kChunk + h * kLanes + j] - gz[j] * row[3 * kChunk + h * kLanes + j];
          grad_votes[h][j] += w[j] * row[kChunk + h * kLanes + j] + d * slope;
        }
      }
    }
    const T* m = poses + i * kEntries;
    const T* w = g.transforms + (i * g.chunks + chunk) * kChunk;
    T* gw = grad_transforms + (i * g.chunks + chunk) * kChunk;
    for (int64_t y = 0; y < kSide; ++y) {
      for (int64_t z = 0; z < kSide; ++z) {
        T* out = gw + (y * kSide + z) * kLanes;
        for (int64_t x = 0; x < kSide; ++x) {
          const T a = m[x * kSide + y];
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) out[j] += a * grad_votes[x * kSide + z][j];
        }
      }
    }
    for (int64_t x = 0; x < kSide; ++x) {
      for (int64_t y = 0; y < kSide; ++y) {
        T acc[kLanes] = {};
        for (int64_t z = 0; z < kSide; ++z) {
          const T* wr = w + (y * kSide + z) * kLanes;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) acc[j] += grad_votes[x * kSide + z][j] * wr[j];
        }
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
        grad_poses[i * kEntries + x * kSide + y] += total;
      }
    }
  }
}

// Backward through iteration t (its E-step if any, then its M-step) for every block.
template <typename T>
void backward_pass(const Layer<T>& g, int64_t t, const Stats<T>& stats, const BackwardBuffers<T>& buf,
                   int64_t ranges) {
  const bool last = t == g.iterations - 1;
  const T lambda = g.inverse_temperature[t];
  const int64_t I = g.children, Cp = g.padded_types;
  for_block_ranges(g.blocks(), ranges, [&](int64_t range, int64_t first, int64_t end) {
    std::vector<T> votes(I * kChunk), grad_weights(I * kLanes);
    std::vector<T> rows(g.iterations * (4 * kChunk + kLanes));
    T* grad_beta_v = buf.grad_beta_v + range * Cp;
    T* grad_beta_a = buf.grad_beta_a + range * Cp;
    T* grad_transforms = buf.grad_transforms + range * I * g.chunks * kChunk;
    for (int64_t block = first; block < end; ++block) {
      const T* a_in = g.block_activations(block);
      T* grad_a_in = buf.grad_activations + block * I;
      T* slot_sum = buf.slot_sum + block * I;
      if (t > 0) std::fill(slot_sum, slot_sum + I, T(0));
      for (int64_t chunk = 0; chunk < g.chunks; ++chunk) {
        const int64_t c0 = chunk * kLanes;
        block_votes(g, block, chunk, votes.data());
        const T* mean_row = stats.mean_at(t, block, c0);
        const T* variance_row = stats.variance_at(t, block, c0);
        T mean[kEntries][kLanes], inverse[kEntries][kLanes];
        T grad_mean[kEntries][kLanes] = {}, grad_variance[kEntries][kLanes] = {}, grad_activation[kLanes] = {};
        for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) {
            mean[h][j] = mean_row[h * Cp + j];
            inverse[h][j] = T(1) / variance_row[h * Cp + j];
          }
        }
        const T* activation = stats.activation_at(t, block, c0);
        const T* data = stats.data_at(t, block, c0);
        const T* log_variance = stats.log_variance_at(t, block, c0);
        if (last) {
          const T* gm = buf.grad_mean_out + block * kEntries * Cp + c0;
          const T* ga = buf.grad_activation_out + block * Cp + c0;
          for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) grad_mean[h][j] = gm[h * Cp + j];
          }
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) grad_activation[j] = ga[j];
        } else {
          // E-step: g_z = r' (g_r' - sum over the child's parents of r' g_r'), r' the next routing.
          T grad_total[kLanes] = {}, sum_deviations[kEntries][kLanes] = {}, sum_squares[kEntries][kLanes] = {};
          const T* child_sum = buf.child_sum + block * I;
          for (int64_t i = 0; i < I; ++i) {
            const T* r_next = buf.routing + (((t + 1) * g.blocks() + block) * I + i) * Cp + c0;
            const T* grad_next = buf.grad_routing + (block * I + i) * Cp + c0;
            T* gz_out = buf.grad_logits + ((t * g.blocks() + block) * I + i) * Cp + c0;
            T gz[kLanes];
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) {
              gz[j] = r_next[j] * (grad_next[j] - child_sum[i]);
              gz_out[j] = gz[j];
              grad_total[j] += gz[j];
            }
            const T* v = votes.data() + i * kChunk;
            for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
              for (int64_t j = 0; j < kLanes; ++j) {
                const T d = v[h * kLanes + j] - mean[h][j];
                sum_deviations[h][j] += gz[j] * d;
                sum_squares[h][j] += gz[j] * d * d;
              }
            }
          }
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) grad_activation[j] = grad_total[j] / (activation[j] + g.epsilon);
          for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) {
              grad_mean[h][j] = sum_deviations[h][j] * inverse[h][j];
              grad_variance[h][j] =
                  (T(0.5) * sum_squares[h][j] * inverse[h][j] - T(0.5) * grad_total[j]) * inverse[h][j];
            }
          }
        }
        // M-step.
        T grad_data[kLanes], inverse_data[kLanes], complement[kLanes], grad_cost_scaled[kLanes];
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) {
          const T a = activation[j];
          const T grad_pre = grad_activation[j] * a * (T(1) - a) * lambda;
          grad_beta_a[c0 + j] += grad_pre;
          const T grad_cost = -grad_pre * g.cost_factor;
          grad_data[j] = grad_cost * (T(kEntries) * g.beta_v[c0 + j] + T(0.5) * log_variance[j]);
          grad_beta_v[c0 + j] += grad_cost * data[j] * T(kEntries);
          grad_cost_scaled[j] = T(0.5) * grad_cost * data[j];
          inverse_data[j] = T(1) / (data[j] + g.epsilon);
          complement[j] = g.epsilon * inverse_data[j];  // 1 - W, W = R / (R + eps)
        }
        T grad_mean_total[kEntries][kLanes];
        const T* residual = stats.residual_at(t, block, c0);
        T* rows_times = buf.rows_times_votes + ((t * g.blocks() + block) * kEntries) * Cp + c0;
        T* rows_plain = buf.rows_plain + ((t * g.blocks() + block) * kEntries) * Cp + c0;
        for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) {
            grad_variance[h][j] += grad_cost_scaled[j] * inverse[h][j];
            grad_mean_total[h][j] = grad_mean[h][j] - T(2) * grad_variance[h][j] * residual[h * Cp + j];
            rows_times[h * Cp + j] = T(2) * grad_variance[h][j];
            rows_plain[h * Cp + j] = grad_mean_total[h][j];
          }
        }
        // g_w_i = sum_h (g_mu_total V + g_sigma2 (V - mu)^2), computed centred as
        // g_w_i - c with c = sum_h g_mu_total mu (no cancellation when V is close to mu);
        // g_r'_i = (g_w_i - sum_k w_k g_w_k) / (R + eps) = (g_w_i - c - S' + c (1 - W)) / (R + eps)
        // with S' = sum_k w_k (g_w_k - c).
        T weighted_total[kLanes] = {}, shift[kLanes] = {};
        for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) shift[j] += grad_mean_total[h][j] * mean[h][j];
        }
        for (int64_t i = 0; i < I; ++i) {
          const T* v = votes.data() + i * kChunk;
          const T* r = buf.routing + ((t * g.blocks() + block) * I + i) * Cp + c0;
          T gw[kLanes] = {};
          for (int64_t h = 0; h < kEntries; ++h) {
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) {
              const T d = v[h * kLanes + j] - mean[h][j];
              gw[j] += (grad_mean_total[h][j] + grad_variance[h][j] * d) * d;
            }
          }
          T* out = grad_weights.data() + i * kLanes;
#pragma omp simd
          for (int64_t j = 0; j < kLanes; ++j) {
            out[j] = gw[j];
            weighted_total[j] += gw[j] * r[j] * a_in[i] * inverse_data[j];
          }
        }
        // g_r' = (g_w - S) / (R + eps) + g_R; g_a_in += sum_c g_r' r; g_r = g_r' a_in.
        for (int64_t i = 0; i < I; ++i) {
          const T* r = buf.routing + ((t * g.blocks() + block) * I + i) * Cp + c0;
          const T* gw = grad_weights.data() + i * kLanes;
          T grad_weighted[kLanes];
          T to_activation = 0;
#pragma omp simd reduction(+ : to_activation)
          for (int64_t j = 0; j < kLanes; ++j) {
            grad_weighted[j] = (gw[j] - weighted_total[j] + shift[j] * complement[j]) * inverse_data[j] + grad_data[j];
            to_activation += grad_weighted[j] * r[j];
          }
          grad_a_in[i] += to_activation;
          if (t > 0) {
            T* grad_routing = buf.grad_routing + (block * I + i) * Cp + c0;
            T to_child = 0;
#pragma omp simd reduction(+ : to_child)
            for (int64_t j = 0; j < kLanes; ++j) {
              grad_routing[j] = grad_weighted[j] * a_in[i];
              to_child += r[j] * grad_routing[j];
            }
            slot_sum[i] += to_child;
          }
        }
        if (t == 0) votes_gradient(g, stats, buf, block, chunk, votes.data(), grad_transforms, rows);
      }
    }
  });
}

// ------------------------------------------------------------------ Python entry points

template <typename T>
Layer<T> make_layer(const torch::Tensor& windows, const torch::Tensor& transforms, const c10::optional<torch::Tensor>& offsets,
                    const torch::Tensor& activations, const torch::Tensor& beta_v, const torch::Tensor& beta_a,
                    const torch::Tensor& prior, const torch::Tensor& slot_child, int64_t child_positions, int64_t types,
                    const std::vector<double>& inverse_temperature, double cost_factor, double variance_floor,
                    double epsilon) {
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

int64_t default_ranges(int64_t blocks) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)); }

// Returns [mean (N, L, 16, Cp), activations (N, L, Cp)] and, with save, the saved state
// [routing (T, N, L, I, Cp), means, variances (T, N, L, 16, Cp), activations, data, log variances (T, N, L, Cp),
// residuals (T, N, L, 16, Cp)].
std::vector<torch::Tensor> forward(const torch::Tensor& windows, const torch::Tensor& transforms,
                                   const c10::optional<torch::Tensor>& offsets, const torch::Tensor& activations,
                                   const torch::Tensor& beta_v, const torch::Tensor& beta_a, const torch::Tensor& prior,
                                   const torch::Tensor& slot_child, int64_t child_positions, int64_t types,
                                   const std::vector<double>& inverse_temperature, double cost_factor,
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
                                             slot_child, child_positions, types, inverse_temperature, cost_factor,
                                             variance_floor, epsilon);
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
    const int64_t ranges = default_ranges(g.blocks());
    for (int64_t t = 0; t < T_it; ++t) {
      forward_pass(g, t, stats, save ? t : 0, buf, ranges);
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
                                    const std::vector<double>& inverse_temperature, double cost_factor,
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
  const int64_t ranges = default_ranges(N * L);
  torch::Tensor grad_logits = torch::empty({std::max<int64_t>(T_it - 1, 1), N, L, I, Cp}, options);
  torch::Tensor grad_routing = torch::empty({N, L, I, Cp}, options);
  torch::Tensor slot_sum = torch::empty({N, L, I}, options);
  torch::Tensor child_sum = torch::empty({N, L, I}, options);
  torch::Tensor rows_times = torch::empty({T_it, N, L, kEntries, Cp}, options);
  torch::Tensor rows_plain = torch::empty({T_it, N, L, kEntries, Cp}, options);
  torch::Tensor grad_windows = torch::zeros({N, L, I, kEntries}, options);
  torch::Tensor grad_activations = torch::zeros({N, L, I}, options);
  torch::Tensor grad_transforms = torch::zeros({ranges, I, K, kSide, kSide, kLanes}, options);
  torch::Tensor grad_beta_v = torch::zeros({ranges, Cp}, options);
  torch::Tensor grad_beta_a = torch::zeros({ranges, Cp}, options);
  AT_DISPATCH_FLOATING_TYPES(windows.scalar_type(), "blocked_routing_backward", [&] {
    pybind11::gil_scoped_release no_gil;
    Layer<scalar_t> g = make_layer<scalar_t>(windows, transforms, offsets, activations, beta_v, beta_a, prior,
                                             slot_child, child_positions, types, inverse_temperature, cost_factor,
                                             variance_floor, epsilon);
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
      backward_pass(g, t, stats, buf, ranges);
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
