// CUDA implementation of the top-k magnitude pruning ops (schemas in prune.cpp).
//
// All tensors of a call are cut into fixed-size chunks described by one small device table
// (pointer, length, dtype, selection group), so every pass is a single launch over all layers:
//
//   radix select, per 12-bit digit from the top of the |w| key (prune.h):
//     hist kernel   one block per chunk; shared-memory histogram of the current digit among
//                   the keys that match the group's prefix so far, flushed to a per-group
//                   global histogram with atomics (pass 1 also flags NaN/inf)
//     select kernel one block per group; block-wide scan of the histogram, finds the bin that
//                   holds the group's remaining rank, extends the prefix, lowers the rank
//   mask kernel     one block per chunk, |w| >= t written as bool
//
// float32 takes 3 hist + 3 select launches, a list of one 16-bit dtype 2 + 2. The state
// (prefix, rank) stays on the device between passes; the only host sync is reading the
// NaN/inf flag at the end, so that the error can be raised.
// Device-generic c10 headers where possible: c10/cuda/* needs build-generated headers that CPU
// wheels of torch lack, and this file must compile with nvcc against any torch (make cuda-check).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cuda_runtime.h>

// A CUDA build of torch ships c10/cuda (its generated config header included): take the current
// stream from there. Headers of a CPU-only torch (the standalone nvcc check) lack it; there
// the generic c10::Stream handle stands in, so that everything else still gets compiled.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
#define SDCLR_FAST_HAVE_C10_CUDA 1
#endif

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <climits>
#include <tuple>
#include <cstring>
#include <vector>

#include "prune.h"

namespace sdclr_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kDigit = 12;                      // bits per pass: a 16 KiB shared histogram
constexpr int kBins = 1 << kDigit;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int64_t kChunk = int64_t(1) << 16;    // elements per block

struct DevChunk {
  const void* data;  // tensor base pointer
  bool* out;         // mask output base pointer (mask kernel only)
  int64_t begin;
  int64_t len;
  int32_t elem;      // Elem
  int32_t group;     // selection group: 0 (pooled) or the tensor index (per tensor)
  int32_t tensor;    // index in the caller's list
  int32_t pad;
};

template <Domain D>
__global__ void __launch_bounds__(kThreads)
    radix_hist_kernel(const DevChunk* __restrict__ chunks, const uint64_t* __restrict__ prefix,
                      int hi, int lo, unsigned long long* __restrict__ hist, int* __restrict__ bad) {
  using Key = typename DomainTraits<D>::Key;
  constexpr int kBits = DomainTraits<D>::kBits;
  __shared__ unsigned int sh[kBins];
  const int nb = 1 << (hi - lo);
  for (int b = threadIdx.x; b < nb; b += kThreads) sh[b] = 0;
  __syncthreads();

  const DevChunk c = chunks[blockIdx.x];
  const bool first = hi == kBits;
  const Key want = first ? Key(0) : static_cast<Key>(prefix[c.group] >> hi);
  const Key mask = static_cast<Key>(nb - 1);
  bool saw_bad = false;
  visit<D>(static_cast<Elem>(c.elem), [&](auto tag) {
    using T = decltype(tag);
    const T* p = static_cast<const T*>(c.data) + c.begin;
    if (first) {
      for (int64_t i = threadIdx.x; i < c.len; i += kThreads) {
        const Key key = abs_key<D>(p[i]);
        saw_bad |= key >= static_cast<Key>(DomainTraits<D>::kNonFinite);
        atomicAdd(&sh[key >> lo], 1u);
      }
    } else {
      for (int64_t i = threadIdx.x; i < c.len; i += kThreads) {
        const Key key = abs_key<D>(p[i]);
        if (static_cast<Key>(key >> hi) == want) atomicAdd(&sh[(key >> lo) & mask], 1u);
      }
    }
  });
  if (saw_bad) atomicMin(bad, c.tensor);
  __syncthreads();
  unsigned long long* h = hist + static_cast<int64_t>(c.group) * kBins;
  for (int b = threadIdx.x; b < nb; b += kThreads) {
    if (sh[b]) atomicAdd(&h[b], static_cast<unsigned long long>(sh[b]));
  }
}

// One block per group: find the bin that holds the group's remaining rank.
template <Domain D>
__global__ void __launch_bounds__(kThreads)
    radix_select_kernel(const unsigned long long* __restrict__ hist, int lo, uint64_t* prefix,
                        int64_t* rank, typename DomainTraits<D>::Value* out, bool last) {
  using Key = typename DomainTraits<D>::Key;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int g = blockIdx.x;
  const int64_t r = rank[g];  // read by every thread before the single writer below
  const unsigned long long* h = hist + static_cast<int64_t>(g) * kBins;
  unsigned long long mine[kBinsPerThread];
  unsigned long long local = 0;
  for (int j = 0; j < kBinsPerThread; ++j) {
    mine[j] = h[threadIdx.x * kBinsPerThread + j];  // bins past nb are zero
    local += mine[j];
  }
  unsigned long long before;
  Scan(tmp).ExclusiveSum(local, before);
  if (r < 0) {  // empty group: threshold 0, its mask is empty anyway
    if (last && threadIdx.x == 0) out[g] = 0;
    return;
  }
  const unsigned long long ur = static_cast<unsigned long long>(r);
  if (before <= ur && ur < before + local) {
    unsigned long long below = before;
    int j = 0;
    while (ur >= below + mine[j]) below += mine[j++];
    const uint64_t bin = static_cast<uint64_t>(threadIdx.x * kBinsPerThread + j);
    const uint64_t p = prefix[g] | (bin << lo);
    prefix[g] = p;
    rank[g] = static_cast<int64_t>(ur - below);
    if (last) out[g] = key_value<D>(static_cast<Key>(p));
  }
}

template <typename Cmp, typename T>
__device__ __forceinline__ void mask_loop(const T* __restrict__ x, bool* __restrict__ o,
                                          int64_t len, Cmp t) {
  // float64 elements always compare in float64; the rest in the threshold's precision.
  using C = std::conditional_t<std::is_same_v<T, double>, double, Cmp>;
  const C tc = static_cast<C>(t);
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    o[i] = fabs(static_cast<C>(x[i])) >= tc;
  }
}

template <typename Cmp>
__global__ void __launch_bounds__(kThreads)
    mask_kernel(const DevChunk* __restrict__ chunks, const Cmp* __restrict__ thr, bool per_tensor) {
  const DevChunk c = chunks[blockIdx.x];
  const Cmp t = thr[per_tensor ? c.tensor : 0];
  bool* o = c.out + c.begin;
  switch (static_cast<Elem>(c.elem)) {
    case Elem::F16: mask_loop(static_cast<const c10::Half*>(c.data) + c.begin, o, c.len, t); break;
    case Elem::BF16: mask_loop(static_cast<const c10::BFloat16*>(c.data) + c.begin, o, c.len, t); break;
    case Elem::F32: mask_loop(static_cast<const float*>(c.data) + c.begin, o, c.len, t); break;
    case Elem::F64: mask_loop(static_cast<const double*>(c.data) + c.begin, o, c.len, t); break;
  }
}

// ---------------------------------------------------------------- host side
// The stream PyTorch has made current on the device (what torch.cuda.stream(...) sets).
cudaStream_t current_stream(at::Device device) {
#ifdef SDCLR_FAST_HAVE_C10_CUDA
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
#else
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
#endif
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "sdclr_fast: launch of ", kernel, " failed: ",
              cudaGetErrorString(err));
}

std::vector<DevChunk> make_chunks(const Prepared& p, bool per_tensor,
                                  const std::vector<at::Tensor>* outs) {
  std::vector<DevChunk> v;
  for (size_t i = 0; i < p.keep.size(); ++i) {
    const int64_t n = p.keep[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      DevChunk c;
      c.data = p.keep[i].data_ptr();
      c.out = outs ? (*outs)[i].data_ptr<bool>() : nullptr;
      c.begin = b;
      c.len = std::min(kChunk, n - b);
      c.elem = static_cast<int32_t>(p.elems[i]);
      c.group = per_tensor ? static_cast<int32_t>(i) : 0;
      c.tensor = static_cast<int32_t>(i);
      c.pad = 0;
      v.push_back(c);
    }
  }
  return v;
}

// Copies a host table to the device through pinned memory (the caching host allocator keeps
// the buffer alive until the asynchronous copy is done).
template <typename T>
at::Tensor upload(const std::vector<T>& v, at::Device device) {
  const int64_t bytes = static_cast<int64_t>(std::max<size_t>(v.size(), 1) * sizeof(T));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(T));
  return host.to(device, /*non_blocking=*/true);
}

template <Domain D>
void radix_select(const Prepared& p, const std::vector<DevChunk>& chunks, int64_t groups,
                  const std::vector<int64_t>& ranks, at::Tensor& out, const char* op) {
  constexpr int kBits = DomainTraits<D>::kBits;
  using V = typename DomainTraits<D>::Value;
  const auto device = p.keep[0].device();
  const cudaStream_t stream = current_stream(device);
  const int npasses = (kBits + kDigit - 1) / kDigit;
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor table = upload(chunks, device);
  at::Tensor rank = upload(ranks, device).view(at::kLong).narrow(0, 0, groups);
  at::Tensor prefix = at::zeros({groups}, i64);
  at::Tensor hist = at::zeros({npasses, groups, kBins}, i64);
  at::Tensor bad = at::full({1}, INT_MAX, i64.dtype(at::kInt));
  const auto* tab = reinterpret_cast<const DevChunk*>(table.data_ptr());
  auto* pre = reinterpret_cast<uint64_t*>(prefix.data_ptr<int64_t>());
  int hi = kBits;
  for (int pass = 0; pass < npasses; ++pass) {
    const int lo = std::max(hi - kDigit, 0);
    auto* h = reinterpret_cast<unsigned long long*>(hist[pass].data_ptr<int64_t>());
    if (!chunks.empty()) {
      radix_hist_kernel<D><<<static_cast<unsigned>(chunks.size()), kThreads, 0, stream>>>(
          tab, pre, hi, lo, h, bad.data_ptr<int>());
      check_launch("radix_hist_kernel");
    }
    radix_select_kernel<D><<<static_cast<unsigned>(groups), kThreads, 0, stream>>>(
        h, lo, pre, rank.data_ptr<int64_t>(), out.data_ptr<V>(), pass == npasses - 1);
    check_launch("radix_select_kernel");
    hi = lo;
  }
  const int first_bad = bad.item<int>();  // the one host sync: needed to raise the error
  TORCH_CHECK_VALUE(first_bad == INT_MAX, op, ": tensors[", first_bad,
                    "] contains NaN or inf; magnitude pruning needs finite weights");
}

at::Tensor kth_abs_value_cuda(at::TensorList tensors, int64_t k) {
  const char* op = "kth_abs_value";
  const Prepared p = prepare(tensors, op, c10::DeviceType::CUDA);
  const c10::DeviceGuard guard(p.keep[0].device());
  int64_t n = 0;
  for (const auto& t : p.keep) n += t.numel();
  check_pooled_rank(op, n, k);
  at::Tensor out = at::empty({1}, p.keep[0].options().dtype(threshold_dtype(p.domain)));
  const auto chunks = make_chunks(p, /*per_tensor=*/false, nullptr);
  dispatch_domain(p.domain, [&](auto dc) {
    radix_select<decltype(dc)::value>(p, chunks, 1, {k}, out, op);
  });
  return out.reshape({});
}

at::Tensor kth_abs_value_per_tensor_cuda(at::TensorList tensors, at::IntArrayRef k) {
  const char* op = "kth_abs_value_per_tensor";
  const Prepared p = prepare(tensors, op, c10::DeviceType::CUDA);
  const c10::DeviceGuard guard(p.keep[0].device());
  const int64_t g = static_cast<int64_t>(p.keep.size());
  check_rank_count(op, g, k.size());
  std::vector<int64_t> ranks(g);
  for (int64_t i = 0; i < g; ++i) {
    const int64_t n = p.keep[i].numel();
    check_tensor_rank(op, i, n, k[i]);
    ranks[i] = n == 0 ? -1 : k[i];
  }
  at::Tensor out = at::empty({g}, p.keep[0].options().dtype(threshold_dtype(p.domain)));
  const auto chunks = make_chunks(p, /*per_tensor=*/true, nullptr);
  dispatch_domain(p.domain, [&](auto dc) {
    radix_select<decltype(dc)::value>(p, chunks, g, ranks, out, op);
  });
  return out;
}

std::vector<at::Tensor> abs_ge_masks_cuda(at::TensorList tensors, const at::Tensor& threshold) {
  const char* op = "abs_ge_masks";
  const Prepared p = prepare(tensors, op, c10::DeviceType::CUDA);
  const auto device = p.keep[0].device();
  const c10::DeviceGuard guard(device);
  const int64_t g = static_cast<int64_t>(p.keep.size());
  check_threshold(op, threshold, device, g);
  std::vector<at::Tensor> outs;
  outs.reserve(g);
  for (int64_t i = 0; i < g; ++i) {
    outs.push_back(at::empty(tensors[i].sizes(), p.keep[i].options().dtype(at::kBool)));
  }
  const auto chunks = make_chunks(p, /*per_tensor=*/threshold.numel() != 1, &outs);
  if (chunks.empty()) return outs;
  at::Tensor table = upload(chunks, device);
  const auto* tab = reinterpret_cast<const DevChunk*>(table.data_ptr());
  const bool per_tensor = threshold.numel() != 1;
  const cudaStream_t stream = current_stream(device);
  const unsigned grid = static_cast<unsigned>(chunks.size());
  if (threshold.scalar_type() == at::kDouble) {
    at::Tensor thr = threshold.reshape({-1}).contiguous();
    mask_kernel<double><<<grid, kThreads, 0, stream>>>(tab, thr.data_ptr<double>(), per_tensor);
  } else {
    // float16 / bfloat16 / float32 thresholds are exact in float32
    at::Tensor thr = threshold.reshape({-1}).to(at::kFloat).contiguous();
    mask_kernel<float><<<grid, kThreads, 0, stream>>>(tab, thr.data_ptr<float>(), per_tensor);
  }
  check_launch("mask_kernel");
  return outs;
}

// Selection then one mask launch (the thresholds never leave the device).
std::tuple<at::Tensor, std::vector<at::Tensor>> topk_abs_masks_cuda(at::TensorList tensors,
                                                                    at::IntArrayRef k,
                                                                    bool per_tensor) {
  at::Tensor thr;
  if (per_tensor) {
    thr = kth_abs_value_per_tensor_cuda(tensors, k);
  } else {
    TORCH_CHECK_VALUE(k.size() == 1, "topk_abs_masks: k must hold one rank when per_tensor is "
                      "false, got ", k.size());
    thr = kth_abs_value_cuda(tensors, k[0]).reshape({1});
  }
  return {thr, abs_ge_masks_cuda(tensors, thr)};
}

}  // namespace
}  // namespace sdclr_fast

TORCH_LIBRARY_IMPL(sdclr_fast, CUDA, m) {
  m.impl("kth_abs_value", &sdclr_fast::kth_abs_value_cuda);
  m.impl("kth_abs_value_per_tensor", &sdclr_fast::kth_abs_value_per_tensor_cuda);
  m.impl("abs_ge_masks", &sdclr_fast::abs_ge_masks_cuda);
  m.impl("topk_abs_masks", &sdclr_fast::topk_abs_masks_cuda);
}
