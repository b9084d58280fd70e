// CUDA kernels of multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021).
//
// One thread per output element (b, q, m, d): consecutive threads walk the D channels of one head, so the
// four bilinear corner reads of a sample are contiguous across a warp (coalesced), and the per-sample
// sampling location and attention weight are one broadcast read for the whole group.
// Arithmetic runs in at::opmath_type (float for half/bfloat16/float, double for double); the backward pass
// scatters into value's gradient with atomicAdd on an accumulator of that type (half/bfloat16 atomics would
// lose the gradient's low bits), and reduces the location/weight gradients over the D channel threads with
// warp shuffles.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdint>

#include "ms_deform_attn.h"

namespace rfdetr {
namespace {

constexpr int kThreads = 256;

struct Dims {
  int spatial;   // S
  int heads;     // M
  int channels;  // D
  int queries;   // Q
  int levels;    // L
  int points;    // P
};

// Zero-padded bilinear read of one channel at (x, y) in pixel units (pixel centres at integers).
// `v` points at channel d of pixel 0 of the level; `row` is the stride between pixels (M * D).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t bilinear(const scalar_t* __restrict__ v, int row, int h, int w, acc_t x,
                                          acc_t y) {
  // Written so that NaN coordinates also read zeros.
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < acc_t(w) && y < acc_t(h))) return acc_t(0);
  const acc_t xf = floor(x);
  const acc_t yf = floor(y);
  const int x0 = static_cast<int>(xf);
  const int y0 = static_cast<int>(yf);
  const acc_t lx = x - xf, ly = y - yf;
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  acc_t r = acc_t(0);
  if (y0 >= 0) {
    if (x0 >= 0) r += hy * hx * static_cast<acc_t>(v[(y0 * w + x0) * row]);
    if (x0 + 1 < w) r += hy * lx * static_cast<acc_t>(v[(y0 * w + x0 + 1) * row]);
  }
  if (y0 + 1 < h) {
    if (x0 >= 0) r += ly * hx * static_cast<acc_t>(v[((y0 + 1) * w + x0) * row]);
    if (x0 + 1 < w) r += ly * lx * static_cast<acc_t>(v[((y0 + 1) * w + x0 + 1) * row]);
  }
  return r;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ loc,
                   const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, const LevelShapes shapes,
                   const Dims dims, const int total) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  // idx = ((b * Q + q) * M + m) * D + d
  const int d = idx % dims.channels;
  const int bqm = idx / dims.channels;
  const int m = bqm % dims.heads;
  const int b = bqm / dims.heads / dims.queries;
  const int row = dims.heads * dims.channels;
  const scalar_t* value_bm = value + static_cast<int64_t>(b) * dims.spatial * row + m * dims.channels + d;
  const int samples = dims.levels * dims.points;
  const scalar_t* attn_q = attn + bqm * samples;    // [L, P]
  const scalar_t* loc_q = loc + bqm * samples * 2;  // [L, P, 2]

  acc_t acc = acc_t(0);
  for (int l = 0; l < dims.levels; ++l) {
    const int h = shapes.height[l];
    const int w = shapes.width[l];
    const scalar_t* value_l = value_bm + static_cast<int64_t>(shapes.start[l]) * row;
    for (int p = 0; p < dims.points; ++p) {
      const int s = l * dims.points + p;
      // align_corners=False: x in [0, 1] maps to pixel units with centres at (i + 0.5) / w.
      const acc_t x = static_cast<acc_t>(loc_q[2 * s]) * w - acc_t(0.5);
      const acc_t y = static_cast<acc_t>(loc_q[2 * s + 1]) * h - acc_t(0.5);
      acc += static_cast<acc_t>(attn_q[s]) * bilinear<scalar_t, acc_t>(value_l, row, h, w, x, y);
    }
  }
  out[idx] = static_cast<scalar_t>(acc);
}

// `segment` is the largest power of two <= 32 dividing D: the shuffle reduction runs over aligned groups of
// that many channel threads. When segment == D each (b, q, m) is reduced entirely inside its group and the
// group's first thread writes the location/weight gradients directly; otherwise the partial sums are added
// atomically into zeroed accumulators.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                    const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                    acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc_out,
                    scalar_t* __restrict__ grad_attn_out, acc_t* __restrict__ grad_loc_acc,
                    acc_t* __restrict__ grad_attn_acc, const LevelShapes shapes, const Dims dims,
                    const int total, const int segment) {
  const int raw = blockIdx.x * blockDim.x + threadIdx.x;
  // Threads past the end still take part in the warp shuffles below, with zero contributions.
  const bool active = raw < total;
  const int idx = active ? raw : 0;
  const int d = idx % dims.channels;
  const int bqm = idx / dims.channels;
  const int m = bqm % dims.heads;
  const int b = bqm / dims.heads / dims.queries;
  const int row = dims.heads * dims.channels;
  const int64_t value_offset = static_cast<int64_t>(b) * dims.spatial * row + m * dims.channels + d;
  const scalar_t* value_bm = value + value_offset;
  acc_t* grad_value_bm = grad_value + value_offset;
  const int samples = dims.levels * dims.points;
  const acc_t g = active ? static_cast<acc_t>(grad_out[idx]) : acc_t(0);
  const bool direct = segment == dims.channels;

  for (int l = 0; l < dims.levels; ++l) {
    const int h = shapes.height[l];
    const int w = shapes.width[l];
    const int64_t level_offset = static_cast<int64_t>(shapes.start[l]) * row;
    const scalar_t* v = value_bm + level_offset;
    acc_t* gv = grad_value_bm + level_offset;
    for (int p = 0; p < dims.points; ++p) {
      const int s = bqm * samples + l * dims.points + p;  // index into [B, Q, M, L, P]
      acc_t g_attn = acc_t(0), g_x = acc_t(0), g_y = acc_t(0);
      const acc_t x = static_cast<acc_t>(loc[2 * s]) * w - acc_t(0.5);
      const acc_t y = static_cast<acc_t>(loc[2 * s + 1]) * h - acc_t(0.5);
      if (active && x > acc_t(-1) && y > acc_t(-1) && x < acc_t(w) && y < acc_t(h)) {
        const acc_t weight = static_cast<acc_t>(attn[s]);
        const acc_t gw = g * weight;
        const acc_t xf = floor(x);
        const acc_t yf = floor(y);
        const int x0 = static_cast<int>(xf);
        const int y0 = static_cast<int>(yf);
        const acc_t lx = x - xf, ly = y - yf;
        const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
        const bool in_x0 = x0 >= 0, in_x1 = x0 + 1 < w, in_y0 = y0 >= 0, in_y1 = y0 + 1 < h;
        const int p00 = (y0 * w + x0) * row;
        const int p01 = p00 + row;
        const int p10 = p00 + w * row;
        const int p11 = p10 + row;
        acc_t v00 = acc_t(0), v01 = acc_t(0), v10 = acc_t(0), v11 = acc_t(0);
        if (in_y0 && in_x0) {
          v00 = static_cast<acc_t>(v[p00]);
          atomicAdd(gv + p00, gw * hy * hx);
        }
        if (in_y0 && in_x1) {
          v01 = static_cast<acc_t>(v[p01]);
          atomicAdd(gv + p01, gw * hy * lx);
        }
        if (in_y1 && in_x0) {
          v10 = static_cast<acc_t>(v[p10]);
          atomicAdd(gv + p10, gw * ly * hx);
        }
        if (in_y1 && in_x1) {
          v11 = static_cast<acc_t>(v[p11]);
          atomicAdd(gv + p11, gw * ly * lx);
        }
        g_attn = g * (hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11);
        // d(sample)/d(loc_x) = w * d(sample)/dx, since x = loc_x * w - 0.5 (likewise for y with h).
        g_x = gw * acc_t(w) * (hy * (v01 - v00) + ly * (v11 - v10));
        g_y = gw * acc_t(h) * (hx * (v10 - v00) + lx * (v11 - v01));
      }
      for (int offset = segment >> 1; offset > 0; offset >>= 1) {
        g_attn += __shfl_xor_sync(0xffffffffu, g_attn, offset);
        g_x += __shfl_xor_sync(0xffffffffu, g_x, offset);
        g_y += __shfl_xor_sync(0xffffffffu, g_y, offset);
      }
      if (active && d % segment == 0) {
        if (direct) {
          grad_attn_out[s] = static_cast<scalar_t>(g_attn);
          grad_loc_out[2 * s] = static_cast<scalar_t>(g_x);
          grad_loc_out[2 * s + 1] = static_cast<scalar_t>(g_y);
        } else {
          atomicAdd(grad_attn_acc + s, g_attn);
          atomicAdd(grad_loc_acc + 2 * s, g_x);
          atomicAdd(grad_loc_acc + 2 * s + 1, g_y);
        }
      }
    }
  }
}

struct Checked {
  LevelShapes shapes;
  Dims dims;
  int64_t batch;
};

Checked check_inputs(const at::Tensor& value, c10::IntArrayRef spatial_shapes, const at::Tensor& loc,
                     const at::Tensor& attn) {
  TORCH_CHECK(value.is_cuda() && loc.is_cuda() && attn.is_cuda(),
              "ms_deform_attn (CUDA): value, sampling_locations and attention_weights must be CUDA tensors");
  TORCH_CHECK(value.device() == loc.device() && value.device() == attn.device(),
              "ms_deform_attn (CUDA): inputs are on different devices: ", value.device(), ", ", loc.device(),
              ", ", attn.device());
  TORCH_CHECK(value.scalar_type() == loc.scalar_type() && value.scalar_type() == attn.scalar_type(),
              "ms_deform_attn (CUDA): inputs must share one dtype, got ", value.scalar_type(), ", ",
              loc.scalar_type(), ", ", attn.scalar_type());
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [B, S, M, D], got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [B, Q, M, L, P, 2], got ", loc.sizes());
  TORCH_CHECK(attn.dim() == 5, "ms_deform_attn: attention_weights must be [B, Q, M, L, P], got ",
              attn.sizes());
  TORCH_CHECK(loc.sizes().slice(0, 5) == attn.sizes(), "ms_deform_attn: sampling_locations ", loc.sizes(),
              " and attention_weights ", attn.sizes(), " disagree");
  TORCH_CHECK(loc.size(0) == value.size(0) && loc.size(2) == value.size(2), "ms_deform_attn: value ",
              value.sizes(), " and sampling_locations ", loc.sizes(), " disagree on batch or heads");
  TORCH_CHECK(spatial_shapes.size() % 2 == 0, "ms_deform_attn: spatial_shapes must hold (H, W) pairs");
  const int64_t levels = static_cast<int64_t>(spatial_shapes.size()) / 2;
  TORCH_CHECK(levels == loc.size(3), "ms_deform_attn: sampling_locations has ", loc.size(3),
              " levels but spatial_shapes has ", levels);
  TORCH_CHECK(levels >= 1 && levels <= kMaxLevels, "ms_deform_attn (CUDA): supports 1 to ", kMaxLevels,
              " levels, got ", levels);
  // The kernels index with 32-bit integers.
  TORCH_CHECK(value.numel() < INT_MAX && loc.numel() < INT_MAX &&
                  loc.size(0) * loc.size(1) * value.size(2) * value.size(3) < INT_MAX,
              "ms_deform_attn (CUDA): tensors of 2**31 or more elements are not supported");

  Checked c{};
  int64_t start = 0;
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t h = spatial_shapes[2 * l], w = spatial_shapes[2 * l + 1];
    TORCH_CHECK(h > 0 && w > 0, "ms_deform_attn: level ", l, " has empty shape ", h, "x", w);
    c.shapes.height[l] = static_cast<int>(h);
    c.shapes.width[l] = static_cast<int>(w);
    c.shapes.start[l] = static_cast<int>(start);
    start += h * w;
  }
  c.shapes.levels = static_cast<int>(levels);
  TORCH_CHECK(start == value.size(1), "ms_deform_attn: spatial_shapes cover ", start,
              " positions but value has S = ", value.size(1));
  c.dims = Dims{static_cast<int>(value.size(1)), static_cast<int>(value.size(2)),
                static_cast<int>(value.size(3)), static_cast<int>(loc.size(1)),
                static_cast<int>(levels), static_cast<int>(loc.size(4))};
  c.batch = value.size(0);
  return c;
}

int blocks_for(int64_t total) { return static_cast<int>((total + kThreads - 1) / kThreads); }

}  // namespace

void check_ms_deform_attn_inputs(const at::Tensor& value, c10::IntArrayRef spatial_shapes, const at::Tensor& loc,
                                 const at::Tensor& attn) {
  check_inputs(value, spatial_shapes, loc, attn);
}

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value_in, c10::IntArrayRef spatial_shapes,
                                       const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const Checked c = check_inputs(value_in, spatial_shapes, loc_in, attn_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor loc = loc_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();
  // [B, Q, M * D]
  at::Tensor out = at::empty({c.batch, c.dims.queries, c.dims.heads * c.dims.channels}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), c.shapes, c.dims, static_cast<int>(total));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, c10::IntArrayRef spatial_shapes,
    const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const Checked c = check_inputs(value_in, spatial_shapes, loc_in, attn_in);
  TORCH_CHECK(grad_out_in.device() == value_in.device(), "ms_deform_attn (CUDA): grad_output is on ",
              grad_out_in.device(), ", value on ", value_in.device());
  TORCH_CHECK(grad_out_in.numel() == c.batch * c.dims.queries * c.dims.heads * c.dims.channels,
              "ms_deform_attn (CUDA): grad_output ", grad_out_in.sizes(), " does not match [B, Q, M * D]");
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor grad_out = grad_out_in.to(value_in.scalar_type()).contiguous();
  const at::Tensor value = value_in.contiguous();
  const at::Tensor loc = loc_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();

  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  const bool acc_is_value_type = acc_type == value.scalar_type();
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));

  int segment = 1;
  while (segment < 32 && c.dims.channels % (segment * 2) == 0) segment *= 2;
  const bool direct = segment == c.dims.channels;
  // Every (b, q, m, l, p) is written exactly once when direct, so no zero fill is needed then.
  at::Tensor grad_loc = direct ? at::empty_like(loc) : at::zeros(loc.sizes(), loc.options().dtype(acc_type));
  at::Tensor grad_attn =
      direct ? at::empty_like(attn) : at::zeros(attn.sizes(), attn.options().dtype(acc_type));

  const int64_t total = grad_out.numel();
  if (total > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(),
          attn.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(),
          direct ? grad_loc.data_ptr<scalar_t>() : nullptr, direct ? grad_attn.data_ptr<scalar_t>() : nullptr,
          direct ? nullptr : grad_loc.data_ptr<acc_t>(), direct ? nullptr : grad_attn.data_ptr<acc_t>(),
          c.shapes, c.dims, static_cast<int>(total), segment);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_value = acc_is_value_type ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  if (!direct) {
    grad_loc = grad_loc.to(value.scalar_type());
    grad_attn = grad_attn.to(value.scalar_type());
  }
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace rfdetr
