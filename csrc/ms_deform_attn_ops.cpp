// Registers the CUDA kernels as torch operators with autograd:
//   rfdetr::_ms_deform_attn_cuda(value, spatial_shapes, sampling_locations, attention_weights) -> out
//   rfdetr::_ms_deform_attn_cuda_backward(grad_output, value, spatial_shapes, sampling_locations,
//                                          attention_weights) -> (grad_value, grad_locations, grad_weights)
// The public op torch.ops.rfdetr.ms_deform_attn (defined in Python, rfdetr_core/ops) routes CUDA tensors
// here; the fake (meta) implementations that torch.compile traces with live in rfdetr_core/ops/cuda_ext.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "ms_deform_attn.h"

namespace rfdetr {
namespace {

at::Tensor forward_op(const at::Tensor& value, c10::IntArrayRef spatial_shapes, const at::Tensor& loc,
                      const at::Tensor& attn) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rfdetr::_ms_deform_attn_cuda", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(value, spatial_shapes, loc, attn);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_out, const at::Tensor& value,
                                                           c10::IntArrayRef spatial_shapes,
                                                           const at::Tensor& loc, const at::Tensor& attn) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rfdetr::_ms_deform_attn_cuda_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, c10::IntArrayRef, const at::Tensor&,
                           const at::Tensor&)>();
  return op.call(grad_out, value, spatial_shapes, loc, attn);
}

class MSDeformAttnFunction : public torch::autograd::Function<MSDeformAttnFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& value,
                                                std::vector<int64_t> spatial_shapes, const at::Tensor& loc,
                                                const at::Tensor& attn) {
    at::Tensor out;
    {
      const at::AutoDispatchBelowADInplaceOrView guard;
      out = forward_op(value, spatial_shapes, loc, attn);
    }
    ctx->save_for_backward({value, loc, attn});
    ctx->saved_data["spatial_shapes"] = spatial_shapes;
    return {out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> spatial_shapes = ctx->saved_data["spatial_shapes"].toIntVector();
    auto [grad_value, grad_loc, grad_attn] = backward_op(grad_outputs[0], saved[0], spatial_shapes, saved[1],
                                                         saved[2]);
    // One gradient per forward argument; spatial_shapes has none.
    return {grad_value, at::Tensor(), grad_loc, grad_attn};
  }
};

at::Tensor forward_autograd(const at::Tensor& value, c10::IntArrayRef spatial_shapes, const at::Tensor& loc,
                            const at::Tensor& attn) {
  // Bad input is reported before torch::autograd::Function::apply builds its graph node.
  check_ms_deform_attn_inputs(value, spatial_shapes, loc, attn);
  return MSDeformAttnFunction::apply(value, spatial_shapes.vec(), loc, attn)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rfdetr, m) {
  m.def(
      "_ms_deform_attn_cuda(Tensor value, int[] spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "_ms_deform_attn_cuda_backward(Tensor grad_output, Tensor value, int[] spatial_shapes, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rfdetr, CUDA, m) {
  m.impl("_ms_deform_attn_cuda", &ms_deform_attn_cuda_forward);
  m.impl("_ms_deform_attn_cuda_backward", &ms_deform_attn_cuda_backward);
}

TORCH_LIBRARY_IMPL(rfdetr, Autograd, m) { m.impl("_ms_deform_attn_cuda", &forward_autograd); }

}  // namespace rfdetr
