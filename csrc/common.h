// Types shared by all kernels. Framework-free: kernels take raw pointers and sizes; only
// csrc/bindings.cpp sees torch tensors.
#pragma once

#include <cstdint>

namespace kfuse {

// Element type of a tensor, as bindings.cpp passes it to the kernels.
enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

}  // namespace kfuse
