// Shared pieces of the top-k magnitude pruning ops (CPU: prune.cpp, CUDA: prune_cuda.cu).
//
// Selection works on the IEEE bit pattern of |w|: with the sign bit cleared, the unsigned
// integer of a non-negative float orders exactly like the value (+0 and -0 both become 0,
// denormals sit below the normals, inf and NaN above every finite value). A radix select on
// those keys finds the k-th smallest |w| exactly, ties included, without sorting.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

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
// Host and device: the CPU passes and the CUDA kernels dispatch the same way.
#pragma nv_exec_check_disable
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

}  // namespace sdclr_fast
