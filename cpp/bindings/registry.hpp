// One registration function per binding file; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace arcflow::bind {
void register_fc_params(pybind11::module_& m);        // fc_params.cpp: ActKind, ActParams, FcParams (first)
void register_fc_kernel(pybind11::module_& m);        // fc_kernel.cpp: NNGP / NTK recursions (CPU)
void register_fc_grad(pybind11::module_& m);          // fc_grad.cpp: their w_std / b_std gradients (CPU)
void register_conv_kernel(pybind11::module_& m);      // conv_kernel.cpp: CNN-GP / CNTK of stax networks (CPU)
void register_invertible(pybind11::module_& m);       // invertible.cpp: conv2d, batch-norm, psi, ... (CPU)
void register_cuda(pybind11::module_& m);             // cuda.cpp: device query and CUDA launchers
void register_cuda_invertible(pybind11::module_& m);  // cuda_invertible.cpp: the invertible ops (CUDA)
}  // namespace arcflow::bind
