// Shared pieces of the top-k magnitude pruning ops (CPU: prune.cpp, CUDA: prune_cuda.cu).
//
// Selection works on the IEEE bit pattern of |w|: with the sign bit cleared, the unsigned
// integer of a non-negative float orders exactly like the value (+0 and -0 both become 0,
// denormals sit below the normals, inf and NaN above every finite value). A radix select on
// those keys finds the k-th smallest |w| exactly, ties included, without sorting.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace sdclr_fast {

// The key space every tensor of one call is mapped into. A list of tensors that all have one
// 16-bit dtype uses that dtype's own 15-bit key (a single radix pass on CPU); mixed lists are
// promoted to float32 keys (fp16/bf16 -> fp32 is exact), or to float64 keys if any is float64.
enum class Domain : int32_t { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

// Dtype codes of the elements, as stored in the tables the CUDA kernels read.
enum class Elem : int32_t { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

template <Domain D> struct DomainTraits;
template <> struct DomainTraits<Domain::F16> {
  using Key = uint16_t;
  using Value = float;
  static constexpr int kBits = 15;
  static constexpr Key kNonFinite = 0x7C00;  // smallest |key| that is inf or NaN
};
template <> struct DomainTraits<Domain::BF16> {
  using Key = uint16_t;
  using Value = float;
  static constexpr int kBits = 15;
  static constexpr Key kNonFinite = 0x7F80;
};
template <> struct DomainTraits<Domain::F32> {
  using Key = uint32_t;
  using Value = float;
  static constexpr int kBits = 31;
  static constexpr Key kNonFinite = 0x7F800000u;
};
template <> struct DomainTraits<Domain::F64> {
  using Key = uint64_t;
  using Value = double;
  static constexpr int kBits = 63;
  static constexpr Key kNonFinite = 0x7FF0000000000000ull;
};

// Key of |v| in domain D for an element of type T. Only the combinations the dispatch can
// produce are valid: a 16-bit domain only ever sees its own dtype.
template <Domain D, typename T>
C10_HOST_DEVICE inline typename DomainTraits<D>::Key abs_key(T v) {
  if constexpr (D == Domain::F16 || D == Domain::BF16) {
    return static_cast<uint16_t>(v.x & 0x7FFF);
  } else if constexpr (D == Domain::F32) {
    float f = static_cast<float>(v);
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u & 0x7FFFFFFFu;
  } else {
    double d = static_cast<double>(v);
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    return u & 0x7FFFFFFFFFFFFFFFull;
  }
}

// The value whose |.| has the given key, as the threshold dtype (float32, or float64 for F64).
template <Domain D>
C10_HOST_DEVICE inline typename DomainTraits<D>::Value key_value(typename DomainTraits<D>::Key k) {
  if constexpr (D == Domain::F16) {
    return static_cast<float>(c10::Half(k, c10::Half::from_bits()));
  } else if constexpr (D == Domain::BF16) {
    return static_cast<float>(c10::BFloat16(k, c10::BFloat16::from_bits()));
  } else if constexpr (D == Domain::F32) {
    float f;
    uint32_t u = k;
    memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    double d;
    uint64_t u = k;
    memcpy(&d, &u, sizeof(d));
    return d;
  }
}

// Calls f(T{}) with the element type of e, instantiating only the types domain D can hold.
// Host and device: the CPU passes and the CUDA kernels dispatch the same way. (nvcc alone knows
// the pragma; it lets a host-device template call the host-only or device-only f it is given.)
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <Domain D, typename F>
C10_HOST_DEVICE inline void visit(Elem e, F&& f) {
  if constexpr (D == Domain::F16) {
    f(c10::Half{});
  } else if constexpr (D == Domain::BF16) {
    f(c10::BFloat16{});
  } else {
    switch (e) {
      case Elem::F16: f(c10::Half{}); break;
      case Elem::BF16: f(c10::BFloat16{}); break;
      case Elem::F32: f(float{}); break;
      case Elem::F64:
        if constexpr (D == Domain::F64) f(double{});
        break;
    }
  }
}

// Argument checks shared by the CPU and CUDA ops: the rank of a pooled selection, and one rank
// per tensor (0 for an empty tensor, which has no threshold).
inline void check_pooled_rank(const char* op, int64_t n, int64_t k) {
  TORCH_CHECK_VALUE(n > 0, op, ": the tensors hold no elements");
  TORCH_CHECK_VALUE(k >= 0 && k < n, op, ": k must be in [0, ", n, ") for ", n,
                    " elements, got ", k);
}

inline void check_rank_count(const char* op, int64_t tensors, size_t ranks) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(ranks) == tensors, op,
                    ": k must have one entry per tensor (", tensors, "), got ", ranks);
}

inline void check_tensor_rank(const char* op, int64_t i, int64_t n, int64_t k) {
  TORCH_CHECK_VALUE((n == 0 && k == 0) || (k >= 0 && k < n), op, ": k[", i,
                    "] must be in [0, ", n, ") for tensors[", i, "] with ", n,
                    " elements (0 for an empty tensor), got ", k);
}

// ---------------------------------------------------------------- host side, CPU and CUDA
// Calls f(std::integral_constant<Domain, d>{}): the domain as a compile-time value.
template <typename F>
void dispatch_domain(Domain d, F&& f) {
  switch (d) {
    case Domain::F16: f(std::integral_constant<Domain, Domain::F16>{}); break;
    case Domain::BF16: f(std::integral_constant<Domain, Domain::BF16>{}); break;
    case Domain::F32: f(std::integral_constant<Domain, Domain::F32>{}); break;
    case Domain::F64: f(std::integral_constant<Domain, Domain::F64>{}); break;
  }
}

inline at::ScalarType threshold_dtype(Domain d) {
  return d == Domain::F64 ? at::kDouble : at::kFloat;
}

inline Elem elem_of(const at::Tensor& t, int64_t i, const char* op) {
  switch (t.scalar_type()) {
    case at::kHalf: return Elem::F16;
    case at::kBFloat16: return Elem::BF16;
    case at::kFloat: return Elem::F32;
    case at::kDouble: return Elem::F64;
    default:
      TORCH_CHECK_VALUE(false, op, ": tensors[", i, "] has dtype ", t.scalar_type(),
                        "; expected float16, bfloat16, float32 or float64");
  }
  return Elem::F32;  // unreachable
}

// The inputs of one call: contiguous views (copies only for non-contiguous inputs) kept alive
// for the call, their element types and the key domain they share.
struct Prepared {
  std::vector<at::Tensor> keep;
  std::vector<Elem> elems;
  Domain domain;
};

// Checks the tensor list (non-empty, one device of the implementation's type, float dtypes)
// and picks the domain: a list of one dtype keeps it, a mixed list goes to float32 keys, or to
// float64 keys if any tensor is float64.
inline Prepared prepare(at::TensorList tensors, const char* op, c10::DeviceType expected) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": expected at least one tensor, got an empty list");
  TORCH_CHECK_VALUE(tensors.size() < static_cast<size_t>(INT_MAX), op, ": too many tensors");
  Prepared p;
  const auto device = tensors[0].device();
  bool all_same = true, any_f64 = false;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK_VALUE(t.device() == device, op, ": all tensors must be on one device; tensors[0] is on ",
                      device, " but tensors[", i, "] is on ", t.device());
    TORCH_CHECK_VALUE(device.type() == expected, op, ": ", c10::DeviceTypeName(expected),
                      " implementation called with tensors on ", device);
    const Elem e = elem_of(t, i, op);
    all_same = all_same && t.scalar_type() == tensors[0].scalar_type();
    any_f64 = any_f64 || e == Elem::F64;
    p.elems.push_back(e);
    p.keep.push_back(t.contiguous());
  }
  p.domain = all_same ? static_cast<Domain>(static_cast<int32_t>(p.elems[0]))
                      : (any_f64 ? Domain::F64 : Domain::F32);
  return p;
}

// The threshold argument of abs_ge_masks: a floating tensor on the tensors' device holding one
// value, or one per tensor (g of them).
inline void check_threshold(const char* op, const at::Tensor& threshold, at::Device device,
                            int64_t g) {
  TORCH_CHECK_VALUE(threshold.device() == device, op, ": threshold must be on the tensors' device (",
                    device, "), got ", threshold.device());
  TORCH_CHECK_VALUE(at::isFloatingType(threshold.scalar_type()), op,
                    ": threshold must be a floating tensor, got ", threshold.scalar_type());
  TORCH_CHECK_VALUE(threshold.numel() == 1 || threshold.numel() == g, op,
                    ": threshold must hold 1 value or one per tensor (", g, "), got ",
                    threshold.numel());
}

}  // namespace sdclr_fast
