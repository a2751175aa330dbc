// Bindings of the invertible-network ops (filled in by the invertible-blocks work).
#include "registry.hpp"

namespace arcflow::bind {
void register_invertible(pybind11::module_& m) { (void)m; }
}  // namespace arcflow::bind
