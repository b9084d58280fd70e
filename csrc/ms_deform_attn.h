// Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021): CUDA launchers.
//
// Shapes (all tensors contiguous, on one CUDA device, one floating dtype):
//   value              [B, S, M, D]        S = sum over levels of H_l * W_l, M heads of D channels
//   sampling_locations [B, Q, M, L, P, 2]  (x, y) in [0, 1]; bilinear, zero padding, align_corners=False
//   attention_weights  [B, Q, M, L, P]
//   output             [B, Q, M * D]
// The pure-PyTorch path in rfdetr_core/ops/deform_attn.py is the reference these kernels must match.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <tuple>

namespace rfdetr {

// Upper bound on feature levels: level shapes travel to the kernels by value (no host-to-device copy).
constexpr int kMaxLevels = 16;

struct LevelShapes {
  int height[kMaxLevels];
  int width[kMaxLevels];
  int start[kMaxLevels];  // offset of the level's first pixel along S
  int levels;
};

// Raises c10::Error naming the problem when the inputs do not fit the shapes above (same dtype and device,
// 1..kMaxLevels levels covering S, fewer than 2**31 elements).
void check_ms_deform_attn_inputs(const at::Tensor& value, c10::IntArrayRef spatial_shapes,
                                 const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

// Forward: returns [B, Q, M * D] in value's dtype.
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, c10::IntArrayRef spatial_shapes,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

// Backward: gradients of value [B, S, M, D], sampling_locations [B, Q, M, L, P, 2] and
// attention_weights [B, Q, M, L, P] given grad_output [B, Q, M * D].
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& grad_output, const at::Tensor& value, c10::IntArrayRef spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

}  // namespace rfdetr
