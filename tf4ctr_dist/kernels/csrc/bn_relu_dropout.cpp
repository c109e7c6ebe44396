// BatchNorm1d (training) -> ReLU -> inverted dropout on a (B, N) float32 activation, forward and
// backward, in a few passes over memory on torch's intra-op threads.
//
// BatchNorm's input is x + shift, x the preceding Linear's matmul output and shift its bias. In
// training BatchNorm subtracts the batch mean, so the shift only moves the running mean and its
// gradient is zero: leaving it out of x saves addmm's pass that writes the broadcast bias, and the
// bias gradient's column sum.
//
// Built on first use by tf4ctr_dist/kernels/build.py. The eager composition makes about ten
// passes over the (B, N) tensor (BatchNorm statistics and normalisation, mask words, compares,
// mask conversion and two multiplies; in backward a mask multiply and BatchNorm's two passes);
// this kernel makes four: one statistics pass and one output pass forward, two passes backward.
//
// Dropout keep decisions are the eager path's (`dropout_keep_mask` in mlp.py): numpy's SFC64 words,
// generated here from the generator state the caller passes, four little-endian 16-bit lanes per
// word in element order; element i is kept iff its lane, read as int16, is >= drop_levels - 2^15,
// i.e. P(drop) = drop_levels / 2^16. Forward also writes the combined ReLU and dropout mask
// (y > 0) as one byte per element, which backward reads instead of the 4-byte output.
//
// Column statistics are summed in float over blocks of kBlock rows and in double across blocks and
// threads, so their error does not grow with the batch size.
//
// For BatchNorm whose statistics are pooled over several workers, forward and backward are also
// registered in two halves each (bn_batch_moments then bn_relu_dropout_pooled_forward;
// bn_relu_dropout_grad_sums then bn_relu_dropout_pooled_backward): the caller pools the per-worker
// moments and gradient sums in between (kernels/ops.py). Both ways run the same code: with one
// worker the halves give the fused ops' results bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kChunkRows = 256;  // rows per chunk of the forward statistics

// numpy's SFC64 (Chris Doty-Humphrey's Small Fast Chaotic generator): state (a, b, c, counter).
void sfc64_fill(uint64_t state[4], uint64_t* __restrict out, int64_t count) {
  uint64_t a = state[0], b = state[1], c = state[2], w = state[3];
  for (int64_t k = 0; k < count; ++k) {
    const uint64_t tmp = a + b + w++;
    a = b ^ (b >> 11);
    b = c + (c << 3);
    c = ((c << 24) | (c >> 40)) + tmp;
    out[k] = tmp;
  }
}

// s1[c] = sum (x[r, c] - pivot[c]), s2[c] = sum (x[r, c] - pivot[c])^2 over rows [r0, r1): one
// pass for mean and variance; the pivot (a row of x) keeps the two sums free of cancellation.
void shifted_sums(const float* __restrict x, const float* __restrict pivot, int64_t r0, int64_t r1, int64_t n,
                  double* __restrict s1, double* __restrict s2, float* __restrict b1, float* __restrict b2) {
  for (int64_t c = 0; c < n; ++c) {
    s1[c] = 0.0;
    s2[c] = 0.0;
  }
  for (int64_t rb = r0; rb < r1; rb += kBlock) {
    for (int64_t c = 0; c < n; ++c) {
      b1[c] = 0.f;
      b2[c] = 0.f;
    }
    const int64_t re = std::min(r1, rb + kBlock);
    for (int64_t r = rb; r < re; ++r) {
      const float* __restrict row = x + r * n;
      for (int64_t c = 0; c < n; ++c) {
        const float d = row[c] - pivot[c];
        b1[c] += d;
        b2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < n; ++c) {
      s1[c] += b1[c];
      s2[c] += b2[c];
    }
  }
}

// y[r, c] = max(x[r, c] * a[c] + b[c], 0) * (kept ? scale : 0) and mask[r, c] = y[r, c] > 0 for
// rows [r0, r1); lanes (B * n 16-bit lanes) decide "kept", or everything is kept when lanes is null.
void normalize_relu_dropout(const float* __restrict x, const float* __restrict a, const float* __restrict b,
                            int64_t r0, int64_t r1, int64_t n, const uint16_t* __restrict lanes,
                            uint16_t drop_levels, float scale, float* __restrict y, uint8_t* __restrict mask) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict row = x + r * n;
    float* __restrict out = y + r * n;
    uint8_t* __restrict m = mask + r * n;
    if (lanes == nullptr) {
      for (int64_t c = 0; c < n; ++c) {
        const float v = std::max(row[c] * a[c] + b[c], 0.f) * scale;
        out[c] = v;
        m[c] = v > 0.f;
      }
      continue;
    }
    const uint16_t* __restrict lane = lanes + r * n;
    for (int64_t c = 0; c < n; ++c) {
      // flipping the sign bit maps int16 order onto uint16 order
      const float keep = static_cast<uint16_t>(lane[c] ^ 0x8000U) >= drop_levels ? scale : 0.f;
      const float v = std::max(row[c] * a[c] + b[c], 0.f) * keep;
      out[c] = v;
      m[c] = v > 0.f;
    }
  }
}

// s[c] = sum gy, sx[c] = sum gy * (x - mean) over rows [r0, r1), gy = mask * g * scale.
void grad_sums(const float* __restrict g, const float* __restrict x, const uint8_t* __restrict mask,
               const float* __restrict mean, float scale, int64_t r0, int64_t r1, int64_t n,
               double* __restrict s, double* __restrict sx, float* __restrict bs, float* __restrict bsx) {
  for (int64_t c = 0; c < n; ++c) {
    s[c] = 0.0;
    sx[c] = 0.0;
  }
  for (int64_t rb = r0; rb < r1; rb += kBlock) {
    for (int64_t c = 0; c < n; ++c) {
      bs[c] = 0.f;
      bsx[c] = 0.f;
    }
    const int64_t re = std::min(r1, rb + kBlock);
    for (int64_t r = rb; r < re; ++r) {
      const float* __restrict gr = g + r * n;
      const float* __restrict xr = x + r * n;
      const uint8_t* __restrict mr = mask + r * n;
      for (int64_t c = 0; c < n; ++c) {
        const float gy = mr[c] ? gr[c] * scale : 0.f;
        bs[c] += gy;
        bsx[c] += gy * (xr[c] - mean[c]);
      }
    }
    for (int64_t c = 0; c < n; ++c) {
      s[c] += bs[c];
      sx[c] += bsx[c];
    }
  }
}

// gx = k1 * (gy - k2 - (x - mean) * k3) for rows [r0, r1).
void grad_input(const float* __restrict g, const float* __restrict x, const uint8_t* __restrict mask,
                const float* __restrict mean, const float* __restrict k1, const float* __restrict k2,
                const float* __restrict k3, float scale, int64_t r0, int64_t r1, int64_t n, float* __restrict gx) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict gr = g + r * n;
    const float* __restrict xr = x + r * n;
    const uint8_t* __restrict mr = mask + r * n;
    float* __restrict out = gx + r * n;
    for (int64_t c = 0; c < n; ++c) {
      const float gy = mr[c] ? gr[c] * scale : 0.f;
      out[c] = k1[c] * (gy - k2[c] - (xr[c] - mean[c]) * k3[c]);
    }
  }
}

// One task per intra-op thread for the element-wise passes (no sums: any split gives the same bits).
int64_t num_tasks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 64));
}

// The column sums go over fixed chunks of rows, added in chunk order: their rounding, and so the
// result, depends on the batch size only, not on the thread count or which thread took a chunk.
int64_t stat_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows / kBlock, (rows + kChunkRows - 1) / kChunkRows));
}

template <typename Fn>
void for_each_task(int64_t tasks, const Fn& fn) {
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t);
  });
}

// words[k], k < words.numel(): numpy's SFC64 from the state `sfc64_state` ((4,) int64) holds.
void fill_words(const at::Tensor& sfc64_state, at::Tensor& words) {
  uint64_t state[4];
  std::memcpy(state, sfc64_state.data_ptr<int64_t>(), sizeof(state));
  sfc64_fill(state, reinterpret_cast<uint64_t*>(words.data_ptr<int64_t>()), words.numel());
}

// first[c], second[c]: the chunks' two (n) partial sums ((chunks, 2, n) in `partial`), added in
// chunk order.
void add_chunks(const std::vector<double>& partial, int64_t chunks, int64_t n, double* first, double* second) {
  for (int64_t c = 0; c < n; ++c) {
    double a = 0.0, b = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      a += partial[k * n * 2 + c];
      b += partial[k * n * 2 + n + c];
    }
    first[c] = a;
    second[c] = b;
  }
}

// mean[c] and squares[c] = sum (x[r, c] - mean[c])^2 over all rows, from shifted_sums around the
// first row, in fixed chunks of rows added in chunk order. `side` runs first on one thread while
// the others start on the chunks, which go to whichever thread is free (the order of the sums is
// fixed, so the result does not depend on who did what).
template <typename Side>
void column_moments(const float* xp, int64_t rows, int64_t n, double* mean, double* squares, const Side& side) {
  const std::vector<float> pivot(xp, xp + n);
  const int64_t chunks = stat_chunks(rows);
  std::vector<double> partial(chunks * n * 2);
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t /*t1*/) {
    if (t0 == 0) side();
    std::vector<float> block(2 * n);
    for (int64_t k = next_chunk++; k < chunks; k = next_chunk++) {
      shifted_sums(xp, pivot.data(), rows * k / chunks, rows * (k + 1) / chunks, n, &partial[k * n * 2],
                   &partial[k * n * 2 + n], block.data(), block.data() + n);
    }
  });
  std::vector<double> sum1(n), sum2(n);
  add_chunks(partial, chunks, n, sum1.data(), sum2.data());
  for (int64_t c = 0; c < n; ++c) {
    const double shift_mean = sum1[c] / rows;
    mean[c] = pivot[c] + shift_mean;
    squares[c] = std::max(0.0, sum2[c] - sum1[c] * shift_mean);
  }
}

// s[c], sx[c]: grad_sums over all rows, in the same fixed chunks, added in chunk order.
void chunked_grad_sums(const float* gp, const float* xp, const uint8_t* maskp, const float* mp, float scale,
                       int64_t rows, int64_t n, double* s, double* sx) {
  const int64_t chunks = stat_chunks(rows);
  std::vector<double> partial(chunks * n * 2);
  std::vector<float> blocks(chunks * n * 2);
  for_each_task(chunks, [&](int64_t k) {
    double* p = &partial[k * n * 2];
    float* bs = &blocks[k * n * 2];
    grad_sums(gp, xp, maskp, mp, scale, rows * k / chunks, rows * (k + 1) / chunks, n, p, p + n, bs, bs + n);
  });
  add_chunks(partial, chunks, n, s, sx);
}

void check_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "bn_relu_dropout: ", name, " must be a contiguous float32 vector of ", n, " values, got ",
              t.dtype(), " of shape ", t.sizes());
}

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(),
              "bn_relu_dropout: ", name, " must be a contiguous (B, N) float32 CPU tensor, got ", t.dtype(),
              " of shape ", t.sizes());
}

void check_mask(const at::Tensor& mask, const at::Tensor& x) {
  TORCH_CHECK(mask.dtype() == at::kByte && mask.is_contiguous() && mask.sizes() == x.sizes(),
              "bn_relu_dropout: mask must be a contiguous uint8 tensor of the input's shape");
}

void check_moments(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.dtype() == at::kDouble && t.dim() == 2 && t.size(0) == 2 && t.size(1) == n && t.is_contiguous(),
              "bn_relu_dropout: ", name, " must be a contiguous (2, ", n, ") float64 tensor, got ", t.dtype(),
              " of shape ", t.sizes());
}

// The forward pass after the statistics: from the batch mean and sum of squared deviations of
// `count` rows (per column, double), the normalisation and the running-statistics update, then
// the output pass over x. -> (y (B, N), mean (N), invstd (N), mask (B, N) uint8).
std::vector<at::Tensor> normalize_from_moments(const at::Tensor& x, const double* batch_mean, const double* squares,
                                               int64_t count, const at::Tensor& shift, const at::Tensor& weight,
                                               const at::Tensor& bias, at::Tensor& running_mean,
                                               at::Tensor& running_var, double momentum, double eps,
                                               int64_t drop_levels, double scale, const at::Tensor& words) {
  const int64_t rows = x.size(0), n = x.size(1);
  auto mean = at::empty({n}, x.options());
  auto invstd = at::empty({n}, x.options());
  float* mp = mean.data_ptr<float>();
  float* ip = invstd.data_ptr<float>();
  std::vector<float> a(n), b(n);
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* sp = shift.data_ptr<float>();
  float* rmp = running_mean.data_ptr<float>();
  float* rvp = running_var.data_ptr<float>();
  for (int64_t c = 0; c < n; ++c) {
    mp[c] = static_cast<float>(batch_mean[c]);
    ip[c] = static_cast<float>(1.0 / std::sqrt(squares[c] / count + eps));
    a[c] = wp[c] * ip[c];
    b[c] = bp[c] - mp[c] * a[c];
    // running variance: unbiased, as torch's BatchNorm
    rmp[c] = static_cast<float>((1.0 - momentum) * rmp[c] + momentum * (mp[c] + sp[c]));
    rvp[c] = static_cast<float>((1.0 - momentum) * rvp[c] + momentum * squares[c] / (count - 1));
  }

  auto y = at::empty_like(x);
  float* yp = y.data_ptr<float>();
  auto mask = at::empty(x.sizes(), x.options().dtype(at::kByte));
  uint8_t* maskp = mask.data_ptr<uint8_t>();
  const uint16_t* lanes = words.defined() ? reinterpret_cast<const uint16_t*>(words.data_ptr<int64_t>()) : nullptr;
  const float* xp = x.data_ptr<float>();
  const int64_t tasks = num_tasks(rows);
  for_each_task(tasks, [&](int64_t t) {
    normalize_relu_dropout(xp, a.data(), b.data(), rows * t / tasks, rows * (t + 1) / tasks, n, lanes,
                           static_cast<uint16_t>(drop_levels), static_cast<float>(scale), yp, maskp);
  });
  return {y, mean, invstd, mask};
}

void check_forward_args(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& weight,
                        const at::Tensor& bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                        int64_t drop_levels, double scale, const at::Tensor& sfc64_state) {
  check_matrix(x, "input");
  const int64_t n = x.size(1);
  check_vector(shift, n, "shift");
  check_vector(weight, n, "weight");
  check_vector(bias, n, "bias");
  check_vector(running_mean, n, "running_mean");
  check_vector(running_var, n, "running_var");
  TORCH_CHECK(drop_levels >= 0 && drop_levels < 65536 && scale >= 1.0, "bn_relu_dropout: bad dropout");
  TORCH_CHECK(sfc64_state.dtype() == at::kLong && sfc64_state.numel() == 4 && sfc64_state.is_contiguous(),
              "bn_relu_dropout: sfc64_state must be 4 contiguous int64 values");
}

at::Tensor new_words(const at::Tensor& x, int64_t drop_levels) {
  return drop_levels > 0 ? at::empty({(x.numel() + 3) / 4}, x.options().dtype(at::kLong)) : at::Tensor();
}

// -> (y (B, N), batch mean of x (N), inverse batch std (N), mask); updates running_mean and
// running_var in place.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& weight,
                                   const at::Tensor& bias, at::Tensor running_mean, at::Tensor running_var,
                                   double momentum, double eps, int64_t drop_levels, double scale,
                                   const at::Tensor& sfc64_state) {
  check_forward_args(x, shift, weight, bias, running_mean, running_var, drop_levels, scale, sfc64_state);
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(rows > 1, "bn_relu_dropout: BatchNorm needs more than 1 row in training, got ", rows);
  const float* xp = x.data_ptr<float>();
  // The keep lanes come from one generator, so one thread makes them (about 1 ns per word) while
  // the others start on the statistics.
  at::Tensor words = new_words(x, drop_levels);
  std::vector<double> batch_mean(n), squares(n);
  column_moments(xp, rows, n, batch_mean.data(), squares.data(), [&] {
    if (words.defined()) fill_words(sfc64_state, words);
  });
  return normalize_from_moments(x, batch_mean.data(), squares.data(), rows, shift, weight, bias, running_mean,
                                running_var, momentum, eps, drop_levels, scale, words);
}

// -> (2, N) float64: row 0 the column means of x (B, N), row 1 the column sums of squared
// deviations from them: forward's statistics pass, for a caller that pools them over workers.
at::Tensor batch_moments(const at::Tensor& x) {
  check_matrix(x, "input");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(rows >= 1, "bn_batch_moments: no rows");
  const float* xp = x.data_ptr<float>();
  auto moments = at::empty({2, n}, x.options().dtype(at::kDouble));
  double* out = moments.data_ptr<double>();
  column_moments(xp, rows, n, out, out + n, [] {});
  return moments;
}

// forward with the statistics given: `moments` ((2, N) float64, as batch_moments returns them)
// of `count` rows, pooled by the caller over every worker's rows. Same outputs as forward.
std::vector<at::Tensor> pooled_forward(const at::Tensor& x, const at::Tensor& moments, int64_t count,
                                       const at::Tensor& shift, const at::Tensor& weight, const at::Tensor& bias,
                                       at::Tensor running_mean, at::Tensor running_var, double momentum, double eps,
                                       int64_t drop_levels, double scale, const at::Tensor& sfc64_state) {
  check_forward_args(x, shift, weight, bias, running_mean, running_var, drop_levels, scale, sfc64_state);
  const int64_t n = x.size(1);
  check_moments(moments, n, "moments");
  TORCH_CHECK(count > 1, "bn_relu_dropout: BatchNorm needs more than 1 row in training, got ", count);
  at::Tensor words = new_words(x, drop_levels);
  if (words.defined()) fill_words(sfc64_state, words);
  const double* mo = moments.data_ptr<double>();
  return normalize_from_moments(x, mo, mo + n, count, shift, weight, bias, running_mean, running_var, momentum, eps,
                                drop_levels, scale, words);
}

void check_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& mean) {
  check_matrix(grad, "grad");
  check_matrix(x, "input");
  check_mask(mask, x);
  TORCH_CHECK(grad.sizes() == x.sizes(), "bn_relu_dropout: shape mismatch");
  check_vector(mean, x.size(1), "mean");
}

// -> (2, N) float64: per column sum gy and sum gy * (x - mean), gy = mask * grad * scale:
// backward's first pass, for a caller that pools them over workers.
at::Tensor grad_sums_of(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& mean,
                        double scale) {
  check_backward_args(grad, x, mask, mean);
  const int64_t rows = x.size(0), n = x.size(1);
  auto sums = at::empty({2, n}, x.options().dtype(at::kDouble));
  double* sp = sums.data_ptr<double>();
  chunked_grad_sums(grad.data_ptr<float>(), x.data_ptr<float>(), mask.data_ptr<uint8_t>(), mean.data_ptr<float>(),
                    static_cast<float>(scale), rows, n, sp, sp + n);
  return sums;
}

// The backward pass after its sums: grad weight and grad bias from this worker's sums (`own`),
// the input gradient from the sums over all `count` rows (`pooled`; the same as `own` in one
// process). -> (grad input (B, N), grad weight (N), grad bias (N)).
std::vector<at::Tensor> grad_from_sums(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                                       const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                                       const double* own, const double* pooled, int64_t count, double scale) {
  const int64_t rows = x.size(0), n = x.size(1);
  auto grad_weight = at::empty({n}, x.options());
  auto grad_bias = at::empty({n}, x.options());
  float* gwp = grad_weight.data_ptr<float>();
  float* gbp = grad_bias.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  std::vector<float> k1(n), k2(n), k3(n);
  for (int64_t c = 0; c < n; ++c) {
    gbp[c] = static_cast<float>(own[c]);
    gwp[c] = static_cast<float>(own[n + c] * ip[c]);  // sum gy * x_hat
    const double dgamma = pooled[n + c] * ip[c];
    // d x = weight * invstd * (gy - mean(gy) - x_hat * mean(gy * x_hat))
    k1[c] = wp[c] * ip[c];
    k2[c] = static_cast<float>(pooled[c] / count);
    k3[c] = static_cast<float>(dgamma / count * ip[c]);
  }

  auto grad_x = at::empty_like(x);
  float* gxp = grad_x.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const uint8_t* maskp = mask.data_ptr<uint8_t>();
  const float* mp = mean.data_ptr<float>();
  const auto fscale = static_cast<float>(scale);
  const int64_t tasks = num_tasks(rows);
  for_each_task(tasks, [&](int64_t t) {
    grad_input(gp, xp, maskp, mp, k1.data(), k2.data(), k3.data(), fscale, rows * t / tasks, rows * (t + 1) / tasks,
               n, gxp);
  });
  return {grad_x, grad_weight, grad_bias};
}

// -> (grad input (B, N), grad weight (N), grad bias (N)).
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                                    const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& weight, double scale) {
  check_backward_args(grad, x, mask, mean);
  const int64_t n = x.size(1);
  check_vector(invstd, n, "invstd");
  check_vector(weight, n, "weight");
  const at::Tensor sums = grad_sums_of(grad, x, mask, mean, scale);
  const double* sp = sums.data_ptr<double>();
  return grad_from_sums(grad, x, mask, mean, invstd, weight, sp, sp, x.size(0), scale);
}

// backward with the sums given: `own` the (2, N) grad_sums of this worker, `pooled` their sum
// over the workers whose `count` rows forward pooled.
std::vector<at::Tensor> pooled_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                                        const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                                        const at::Tensor& own, const at::Tensor& pooled, int64_t count, double scale) {
  check_backward_args(grad, x, mask, mean);
  const int64_t n = x.size(1);
  check_vector(invstd, n, "invstd");
  check_vector(weight, n, "weight");
  check_moments(own, n, "own sums");
  check_moments(pooled, n, "pooled sums");
  TORCH_CHECK(count > 1, "bn_relu_dropout: BatchNorm needs more than 1 row in training, got ", count);
  return grad_from_sums(grad, x, mask, mean, invstd, weight, own.data_ptr<double>(), pooled.data_ptr<double>(), count,
                        scale);
}

}  // namespace

// Registered as torch.ops.tf4ctr.* (a plain shared library: no Python bindings to compile).
TORCH_LIBRARY(tf4ctr, m) {
  m.def("bn_relu_dropout_forward(Tensor x, Tensor shift, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, float momentum, float eps, int drop_levels, float scale, Tensor sfc64_state) -> Tensor[]",
        &forward);
  m.def("bn_relu_dropout_backward(Tensor grad, Tensor x, Tensor mask, Tensor mean, Tensor invstd, Tensor weight, "
        "float scale) -> Tensor[]",
        &backward);
  m.def("bn_batch_moments(Tensor x) -> Tensor", &batch_moments);
  m.def("bn_relu_dropout_pooled_forward(Tensor x, Tensor moments, int count, Tensor shift, Tensor weight, "
        "Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, float momentum, float eps, int drop_levels, "
        "float scale, Tensor sfc64_state) -> Tensor[]",
        &pooled_forward);
  m.def("bn_relu_dropout_grad_sums(Tensor grad, Tensor x, Tensor mask, Tensor mean, float scale) -> Tensor",
        &grad_sums_of);
  m.def("bn_relu_dropout_pooled_backward(Tensor grad, Tensor x, Tensor mask, Tensor mean, Tensor invstd, "
        "Tensor weight, Tensor own, Tensor pooled, int count, float scale) -> Tensor[]",
        &pooled_backward);
}
