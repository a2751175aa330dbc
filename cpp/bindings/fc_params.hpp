// fc_params from the flat numbers the Python layer passes (CPU engine and CUDA launchers alike).
#pragma once
#include "arcflow/fc_kernel.hpp"

namespace arcflow::bind {

inline fc_params make_fc_params(int kind, double a, double b, int n, int depth, double w_var, double b_var,
                                double gram_scale, int fix_dep) {
  fc_params p;
  p.act.kind = static_cast<act_kind>(kind);
  p.act.a = a;
  p.act.b = b;
  p.act.n = n;
  p.depth = depth;
  p.w_var = w_var;
  p.b_var = b_var;
  p.gram_scale = gram_scale;
  p.fix_dep = fix_dep;
  return p;
}

}  // namespace arcflow::bind
