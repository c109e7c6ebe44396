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

// -> (y (B, N), batch mean of x (N), inverse batch std (N)); updates running_mean and
// running_var in place.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& weight,
                                   const at::Tensor& bias, at::Tensor running_mean, at::Tensor running_var,
                                   double momentum, double eps, int64_t drop_levels, double scale,
                                   const at::Tensor& sfc64_state) {
  check_matrix(x, "input");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(rows > 1, "bn_relu_dropout: BatchNorm needs more than 1 row in training, got ", rows);
  check_vector(shift, n, "shift");
  check_vector(weight, n, "weight");
  check_vector(bias, n, "bias");
  check_vector(running_mean, n, "running_mean");
  check_vector(running_var, n, "running_var");
  TORCH_CHECK(drop_levels >= 0 && drop_levels < 65536 && scale >= 1.0, "bn_relu_dropout: bad dropout");
  TORCH_CHECK(sfc64_state.dtype() == at::kLong && sfc64_state.numel() == 4 && sfc64_state.is_contiguous(),
              "bn_relu_dropout: sfc64_state must be 4 contiguous int64 values");

  const int64_t tasks = num_tasks(rows);
  const float* xp = x.data_ptr<float>();
  auto mean = at::empty({n}, x.options());
  auto invstd = at::empty({n}, x.options());
  float* mp = mean.data_ptr<float>();
  float* ip = invstd.data_ptr<float>();

  // The keep lanes come from one generator, so one thread makes them (about 1 ns per word) while
  // the others start on the statistics; chunks of rows go to whichever thread is free. The
  // chunks and the order of their sums are fixed, so the result does not depend on who did what.
  at::Tensor words;
  if (drop_levels > 0) words = at::empty({(rows * n + 3) / 4}, x.options().dtype(at::kLong));
  const int64_t chunks = stat_chunks(rows);
  std::vector<double> partial(chunks * n * 2);
  const std::vector<float> pivot(xp, xp + n);
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t /*t1*/) {
    if (t0 == 0 && words.defined()) {
      uint64_t state[4];
      std::memcpy(state, sfc64_state.data_ptr<int64_t>(), sizeof(state));
      sfc64_fill(state, reinterpret_cast<uint64_t*>(words.data_ptr<int64_t>()), words.numel());
    }
    std::vector<float> block(2 * n);
    for (int64_t k = next_chunk++; k < chunks; k = next_chunk++) {
      shifted_sums(xp, pivot.data(), rows * k / chunks, rows * (k + 1) / chunks, n, &partial[k * n * 2],
                   &partial[k * n * 2 + n], block.data(), block.data() + n);
    }
  });
  std::vector<float> a(n), b(n);
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* sp = shift.data_ptr<float>();
  float* rmp = running_mean.data_ptr<float>();
  float* rvp = running_var.data_ptr<float>();
  for (int64_t c = 0; c < n; ++c) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      s1 += partial[k * n * 2 + c];
      s2 += partial[k * n * 2 + n + c];
    }
    const double shift_mean = s1 / rows;
    const double squares = std::max(0.0, s2 - s1 * shift_mean);  // sum (x - mean)^2
    mp[c] = static_cast<float>(pivot[c] + shift_mean);
    ip[c] = static_cast<float>(1.0 / std::sqrt(squares / rows + eps));
    a[c] = wp[c] * ip[c];
    b[c] = bp[c] - mp[c] * a[c];
    // running variance: unbiased, as torch's BatchNorm
    rmp[c] = static_cast<float>((1.0 - momentum) * rmp[c] + momentum * (mp[c] + sp[c]));
    rvp[c] = static_cast<float>((1.0 - momentum) * rvp[c] + momentum * squares / (rows - 1));
  }

  auto y = at::empty_like(x);
  float* yp = y.data_ptr<float>();
  auto mask = at::empty(x.sizes(), x.options().dtype(at::kByte));
  uint8_t* maskp = mask.data_ptr<uint8_t>();
  const uint16_t* lanes = words.defined() ? reinterpret_cast<const uint16_t*>(words.data_ptr<int64_t>()) : nullptr;
  for_each_task(tasks, [&](int64_t t) {
    normalize_relu_dropout(xp, a.data(), b.data(), rows * t / tasks, rows * (t + 1) / tasks, n, lanes,
                           static_cast<uint16_t>(drop_levels), static_cast<float>(scale), yp, maskp);
  });
  return {y, mean, invstd, mask};
}

// -> (grad input (B, N), grad weight (N), grad bias (N)).
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                                    const at::Tensor& mean, const at::Tensor& invstd,
                                    const at::Tensor& weight, double scale) {
  check_matrix(grad, "grad");
  check_matrix(x, "input");
  TORCH_CHECK(mask.dtype() == at::kByte && mask.is_contiguous() && mask.sizes() == x.sizes(),
              "bn_relu_dropout: mask must be a contiguous uint8 tensor of the input's shape");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(grad.sizes() == x.sizes(), "bn_relu_dropout: shape mismatch");
  check_vector(mean, n, "mean");
  check_vector(invstd, n, "invstd");
  check_vector(weight, n, "weight");

  const int64_t tasks = num_tasks(rows);
  const int64_t chunks = stat_chunks(rows);
  std::vector<double> partial(chunks * n * 2);
  std::vector<float> blocks(chunks * n * 2);
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const uint8_t* maskp = mask.data_ptr<uint8_t>();
  const float* mp = mean.data_ptr<float>();
  const float* ip = invstd.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const auto fscale = static_cast<float>(scale);
  for_each_task(chunks, [&](int64_t k) {
    double* s = &partial[k * n * 2];
    float* bs = &blocks[k * n * 2];
    grad_sums(gp, xp, maskp, mp, fscale, rows * k / chunks, rows * (k + 1) / chunks, n, s, s + n, bs, bs + n);
  });

  auto grad_weight = at::empty({n}, x.options());
  auto grad_bias = at::empty({n}, x.options());
  float* gwp = grad_weight.data_ptr<float>();
  float* gbp = grad_bias.data_ptr<float>();
  std::vector<float> k1(n), k2(n), k3(n);
  for (int64_t c = 0; c < n; ++c) {
    double s = 0.0, sx = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      s += partial[k * n * 2 + c];
      sx += partial[k * n * 2 + n + c];
    }
    const double dgamma = sx * ip[c];  // sum gy * x_hat
    gbp[c] = static_cast<float>(s);
    gwp[c] = static_cast<float>(dgamma);
    // d x = weight * invstd * (gy - mean(gy) - x_hat * mean(gy * x_hat))
    k1[c] = wp[c] * ip[c];
    k2[c] = static_cast<float>(s / rows);
    k3[c] = static_cast<float>(dgamma / rows * ip[c]);
  }

  auto grad_x = at::empty_like(x);
  float* gxp = grad_x.data_ptr<float>();
  for_each_task(tasks, [&](int64_t t) {
    grad_input(gp, xp, maskp, mp, k1.data(), k2.data(), k3.data(), fscale, rows * t / tasks, rows * (t + 1) / tasks,
               n, gxp);
  });
  return {grad_x, grad_weight, grad_bias};
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
}
