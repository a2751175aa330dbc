// Bindings of the fully-connected kernel recursions (NNGP, NTK).
#include "registry.hpp"

namespace arcflow::bind {
void register_fc_kernel(pybind11::module_& m) { (void)m; }
}  // namespace arcflow::bind
