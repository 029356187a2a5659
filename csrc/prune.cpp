// Top-k magnitude pruning ops: schemas and the CPU implementation.
//
//   kth_abs_value(Tensor[] tensors, int k) -> Tensor
//       k-th smallest |w| (0-based) over all elements of all tensors pooled, as a 0-d tensor
//       (float32; float64 if a tensor is float64).
//   kth_abs_value_per_tensor(Tensor[] tensors, int[] k) -> Tensor
//       the same per tensor, k[i] for tensor i; a 1-d tensor of len(tensors). Empty tensors
//       get 0 (their k must be 0).
//   abs_ge_masks(Tensor[] tensors, Tensor threshold) -> Tensor[]
//       bool masks |w| >= t (contiguous, shape of w), one threshold for all (threshold.numel()
//       == 1) or one per tensor; a single fused parallel pass over every tensor.
//
// The selection is a most-significant-digit radix select on the bit patterns of |w| (see
// prune.h): pass 1 histograms the top 16 bits of every key, the bin holding rank k fixes
// those bits, and the next pass histograms the following digit among the keys that share the
// fixed prefix. float32 takes two passes, a list of one 16-bit dtype one pass. O(n), exact,
// ties included, no sort and no copy of the data. The finiteness check rides on pass 1: NaN
// and inf keys land in the top bins, so a clean input costs nothing extra.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "prune.h"

namespace sdclr_fast {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // elements per parallel work item

struct Segment {
  const void* data;
  int64_t n;
  Elem elem;
  int64_t tensor;  // index in the caller's list, for error messages
};

struct Chunk {
  const void* data;
  int64_t begin, len;
  Elem elem;
};

Elem elem_of(const at::Tensor& t, int64_t i, const char* op) {
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

// Contiguous views (copies only for non-contiguous inputs) kept alive for the call.
struct Prepared {
  std::vector<at::Tensor> keep;
  std::vector<Segment> segs;
  Domain domain;
};

Prepared prepare(at::TensorList tensors, const char* op) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": expected at least one tensor, got an empty list");
  Prepared p;
  const auto device = tensors[0].device();
  bool all_same = true, any_f64 = false;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK_VALUE(t.device() == device, op, ": all tensors must be on one device; tensors[0] is on ",
                      device, " but tensors[", i, "] is on ", t.device());
    TORCH_CHECK_VALUE(device.is_cpu(), op, ": CPU implementation called with tensors on ", device);
    Elem e = elem_of(t, i, op);
    all_same = all_same && t.scalar_type() == tensors[0].scalar_type();
    any_f64 = any_f64 || e == Elem::F64;
    at::Tensor c = t.contiguous();
    p.segs.push_back({c.data_ptr(), c.numel(), e, i});
    p.keep.push_back(std::move(c));
  }
  if (all_same) {
    p.domain = static_cast<Domain>(static_cast<int32_t>(p.segs[0].elem));
  } else {
    p.domain = any_f64 ? Domain::F64 : Domain::F32;
  }
  return p;
}

// Calls f(T{}) with the element type of e, instantiating only the types domain D can hold.
template <Domain D, typename F>
void visit(Elem e, F&& f) {
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

// First tensor of the group holding a NaN/inf, or -1. Only run when pass 1 saw keys in the
// top bins (inf/NaN, or huge finite values sharing those bins).
template <Domain D>
int64_t find_non_finite(const std::vector<Segment>& segs) {
  using Key = typename DomainTraits<D>::Key;
  for (const auto& s : segs) {
    bool bad = false;
    visit<D>(s.elem, [&](auto tag) {
      using T = decltype(tag);
      const T* p = static_cast<const T*>(s.data);
      for (int64_t i = 0; i < s.n && !bad; ++i) {
        bad = abs_key<D>(p[i]) >= static_cast<Key>(DomainTraits<D>::kNonFinite);
      }
    });
    if (bad) return s.tensor;
  }
  return -1;
}

// Key of the k-th smallest |w| (0-based) among the elements of segs (n > k >= 0 of them).
template <Domain D>
typename DomainTraits<D>::Key select_key(const std::vector<Segment>& segs, int64_t n, int64_t k,
                                         const char* op) {
  using Key = typename DomainTraits<D>::Key;
  constexpr int kBits = DomainTraits<D>::kBits;
  // 16-bit digits keep pass count low for big inputs; small ones use 8-bit digits so that
  // clearing and scanning the histogram does not dominate (layer scope on tiny layers).
  const int digit = n >= (int64_t(1) << 16) ? 16 : 8;

  std::vector<Chunk> chunks;
  for (const auto& s : segs) {
    for (int64_t b = 0; b < s.n; b += kChunk) {
      chunks.push_back({s.data, b, std::min(kChunk, s.n - b), s.elem});
    }
  }

  Key prefix = 0;
  int hi = kBits;  // bits [hi, kBits) of the answer are known (= prefix)
  int64_t rank = k;
  std::vector<int64_t> hist;
  std::mutex merge;
  while (hi > 0) {
    const int lo = std::max(hi - digit, 0);
    const int64_t nb = int64_t(1) << (hi - lo);
    const Key mask = static_cast<Key>(nb - 1);
    const bool first = hi == kBits;
    const Key want = first ? Key(0) : static_cast<Key>(prefix >> hi);
    hist.assign(nb, 0);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
      std::vector<int64_t> local(nb, 0);
      int64_t* h = local.data();
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        visit<D>(ch.elem, [&](auto tag) {
          using T = decltype(tag);
          const T* p = static_cast<const T*>(ch.data) + ch.begin;
          if (first) {
            for (int64_t i = 0; i < ch.len; ++i) ++h[abs_key<D>(p[i]) >> lo];
          } else {
            for (int64_t i = 0; i < ch.len; ++i) {
              const Key key = abs_key<D>(p[i]);
              if ((key >> hi) == want) ++h[(key >> lo) & mask];
            }
          }
        });
      }
      std::lock_guard<std::mutex> g(merge);
      for (int64_t b = 0; b < nb; ++b) hist[b] += local[b];
    });
    if (first) {
      const int64_t top = static_cast<int64_t>(DomainTraits<D>::kNonFinite >> lo);
      bool suspicious = false;
      for (int64_t b = top; b < nb; ++b) suspicious = suspicious || hist[b] != 0;
      if (suspicious) {
        const int64_t bad = find_non_finite<D>(segs);
        TORCH_CHECK_VALUE(bad < 0, op, ": tensors[", bad,
                          "] contains NaN or inf; magnitude pruning needs finite weights");
      }
    }
    int64_t b = 0;
    while (rank >= hist[b]) rank -= hist[b++];
    prefix = static_cast<Key>(prefix | (static_cast<Key>(b) << lo));
    hi = lo;
  }
  return prefix;
}

template <typename F>
void dispatch_domain(Domain d, F&& f) {
  switch (d) {
    case Domain::F16: f(std::integral_constant<Domain, Domain::F16>{}); break;
    case Domain::BF16: f(std::integral_constant<Domain, Domain::BF16>{}); break;
    case Domain::F32: f(std::integral_constant<Domain, Domain::F32>{}); break;
    case Domain::F64: f(std::integral_constant<Domain, Domain::F64>{}); break;
  }
}

at::ScalarType threshold_dtype(Domain d) { return d == Domain::F64 ? at::kDouble : at::kFloat; }

at::Tensor kth_abs_value_cpu(at::TensorList tensors, int64_t k) {
  const char* op = "kth_abs_value";
  Prepared p = prepare(tensors, op);
  int64_t n = 0;
  for (const auto& s : p.segs) n += s.n;
  TORCH_CHECK_VALUE(n > 0, op, ": the tensors hold no elements");
  TORCH_CHECK_VALUE(k >= 0 && k < n, op, ": k must be in [0, ", n, ") for ", n,
                    " elements, got ", k);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(threshold_dtype(p.domain)));
  dispatch_domain(p.domain, [&](auto dc) {
    constexpr Domain D = decltype(dc)::value;
    using V = typename DomainTraits<D>::Value;
    *out.data_ptr<V>() = key_value<D>(select_key<D>(p.segs, n, k, op));
  });
  return out;
}

at::Tensor kth_abs_value_per_tensor_cpu(at::TensorList tensors, at::IntArrayRef k) {
  const char* op = "kth_abs_value_per_tensor";
  Prepared p = prepare(tensors, op);
  const int64_t g = static_cast<int64_t>(p.segs.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(k.size()) == g, op, ": k must have one entry per tensor (",
                    g, "), got ", k.size());
  for (int64_t i = 0; i < g; ++i) {
    const int64_t n = p.segs[i].n;
    TORCH_CHECK_VALUE((n == 0 && k[i] == 0) || (k[i] >= 0 && k[i] < n), op, ": k[", i,
                      "] must be in [0, ", n, ") for tensors[", i, "] with ", n,
                      " elements (0 for an empty tensor), got ", k[i]);
  }
  at::Tensor out = at::zeros({g}, at::TensorOptions().dtype(threshold_dtype(p.domain)));
  dispatch_domain(p.domain, [&](auto dc) {
    constexpr Domain D = decltype(dc)::value;
    using V = typename DomainTraits<D>::Value;
    V* o = out.data_ptr<V>();
    for (int64_t i = 0; i < g; ++i) {
      if (p.segs[i].n == 0) continue;
      o[i] = key_value<D>(select_key<D>({p.segs[i]}, p.segs[i].n, k[i], op));
    }
  });
  return out;
}

std::vector<at::Tensor> abs_ge_masks_cpu(at::TensorList tensors, const at::Tensor& threshold) {
  const char* op = "abs_ge_masks";
  Prepared p = prepare(tensors, op);
  const int64_t g = static_cast<int64_t>(p.segs.size());
  TORCH_CHECK_VALUE(threshold.device().is_cpu(), op, ": threshold must be on the tensors' device (cpu), got ",
                    threshold.device());
  TORCH_CHECK_VALUE(at::isFloatingType(threshold.scalar_type()), op,
                    ": threshold must be a floating tensor, got ", threshold.scalar_type());
  TORCH_CHECK_VALUE(threshold.numel() == 1 || threshold.numel() == g, op,
                    ": threshold must hold 1 value or one per tensor (", g, "), got ",
                    threshold.numel());
  // Compare in float32 when the threshold is at most float32 (exact for fp16/bf16/fp32
  // elements); float64 elements or thresholds compare in float64.
  const bool thr_f64 = threshold.scalar_type() == at::kDouble;
  at::Tensor thr = threshold.reshape({-1}).to(at::kDouble).contiguous();
  const double* tv = thr.data_ptr<double>();

  std::vector<at::Tensor> outs;
  outs.reserve(g);
  struct MaskChunk {
    int64_t seg, begin, len;
    bool* out;
  };
  std::vector<MaskChunk> chunks;
  for (int64_t i = 0; i < g; ++i) {
    outs.push_back(at::empty(tensors[i].sizes(), at::TensorOptions().dtype(at::kBool)));
    bool* o = outs.back().data_ptr<bool>();
    for (int64_t b = 0; b < p.segs[i].n; b += kChunk) {
      chunks.push_back({i, b, std::min(kChunk, p.segs[i].n - b), o});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const MaskChunk& ch = chunks[c];
      const Segment& s = p.segs[ch.seg];
      const double t = tv[threshold.numel() == 1 ? 0 : ch.seg];
      bool* o = ch.out + ch.begin;
      visit<Domain::F64>(s.elem, [&](auto tag) {
        using T = decltype(tag);
        const T* x = static_cast<const T*>(s.data) + ch.begin;
        if constexpr (std::is_same_v<T, double>) {
          for (int64_t i = 0; i < ch.len; ++i) o[i] = std::abs(x[i]) >= t;
        } else {
          if (thr_f64) {
            for (int64_t i = 0; i < ch.len; ++i) {
              o[i] = std::abs(static_cast<double>(static_cast<float>(x[i]))) >= t;
            }
          } else {
            const float tf = static_cast<float>(t);  // exact: the threshold was <= float32
            for (int64_t i = 0; i < ch.len; ++i) o[i] = std::abs(static_cast<float>(x[i])) >= tf;
          }
        }
      });
    }
  });
  return outs;
}

}  // namespace
}  // namespace sdclr_fast

TORCH_LIBRARY(sdclr_fast, m) {
  m.def("kth_abs_value(Tensor[] tensors, int k) -> Tensor");
  m.def("kth_abs_value_per_tensor(Tensor[] tensors, int[] k) -> Tensor");
  m.def("abs_ge_masks(Tensor[] tensors, Tensor threshold) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sdclr_fast, CPU, m) {
  m.impl("kth_abs_value", &sdclr_fast::kth_abs_value_cpu);
  m.impl("kth_abs_value_per_tensor", &sdclr_fast::kth_abs_value_per_tensor_cpu);
  m.impl("abs_ge_masks", &sdclr_fast::abs_ge_masks_cpu);
}

// Importing sdclr_fast._C runs the registrations above (and those of prune_cuda.cu where the
// CUDA part is built); the module itself exports nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sdclr_fast C++/CUDA ops; use them through torch.ops.sdclr_fast or sdclr_fast.ops";
}
