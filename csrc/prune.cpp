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
//   topk_abs_masks(Tensor[] tensors, int[] k, bool per_tensor) -> (Tensor, Tensor[])
//       both at once: thresholds (1 pooled, or one per tensor) and the masks |w| >= threshold.
//       On CPU, large inputs take one fused pass (see fused_select_and_mask).
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
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <tuple>
#include <mutex>
#include <vector>

#include "prune.h"

// The hot loops are compiled for AVX2 and for the baseline ISA and picked when the library
// loads (function multiversioning), rather than built with -march=native: the extension is
// often compiled on one machine and run on another. With SSE2 only, the bracket pass is
// compute-bound at about a third of memory speed.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define SDCLR_FAST_HOT __attribute__((target_clones("avx2", "default")))
#else
#define SDCLR_FAST_HOT
#endif

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
  bool* out;  // mask of the segment (fused select + mask), else nullptr
};

// The prepared inputs as segments (pointer, length, dtype) for the CPU passes.
std::vector<Segment> segments(const Prepared& p) {
  std::vector<Segment> segs;
  for (size_t i = 0; i < p.keep.size(); ++i) {
    segs.push_back({p.keep[i].data_ptr(), p.keep[i].numel(), p.elems[i], static_cast<int64_t>(i)});
  }
  return segs;
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

// Histogram of digit [lo, hi) of the keys in chunks[cb, ce) whose bits above hi equal want
// (all keys when hi is the top: pass 1).
template <Domain D>
void histogram(const std::vector<Chunk>& chunks, int64_t cb, int64_t ce, int hi, int lo,
               typename DomainTraits<D>::Key want, int64_t* h) {
  using Key = typename DomainTraits<D>::Key;
  const Key mask = static_cast<Key>((int64_t(1) << (hi - lo)) - 1);
  const bool first = hi == DomainTraits<D>::kBits;
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
}

// Key of the k-th smallest |w| (0-based) among the elements of segs (n > k >= 0 of them).
// parallel: split every pass over the threads (one big selection); otherwise run on the
// calling thread (many selections scheduled over the threads by the caller).
template <Domain D>
typename DomainTraits<D>::Key select_key(const std::vector<Segment>& segs, int64_t n, int64_t k,
                                         const char* op, bool parallel) {
  using Key = typename DomainTraits<D>::Key;
  constexpr int kBits = DomainTraits<D>::kBits;
  // 16-bit digits keep pass count low for big inputs; small ones use 8-bit digits so that
  // clearing and scanning the histogram does not dominate (layer scope on tiny layers).
  const int digit = n >= (int64_t(1) << 16) ? 16 : 8;

  std::vector<Chunk> chunks;
  for (const auto& s : segs) {
    for (int64_t b = 0; b < s.n; b += kChunk) {
      chunks.push_back({s.data, b, std::min(kChunk, s.n - b), s.elem, nullptr});
    }
  }
  const int64_t nchunks = static_cast<int64_t>(chunks.size());

  Key prefix = 0;
  int hi = kBits;  // bits [hi, kBits) of the answer are known (= prefix)
  int64_t rank = k;
  std::vector<int64_t> hist;
  std::mutex merge;
  while (hi > 0) {
    const int lo = std::max(hi - digit, 0);
    const int64_t nb = int64_t(1) << (hi - lo);
    const bool first = hi == kBits;
    const Key want = first ? Key(0) : static_cast<Key>(prefix >> hi);
    hist.assign(nb, 0);
    if (parallel && nchunks > 1) {
      at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
        std::vector<int64_t> local(nb, 0);
        histogram<D>(chunks, cb, ce, hi, lo, want, local.data());
        std::lock_guard<std::mutex> g(merge);
        for (int64_t b = 0; b < nb; ++b) hist[b] += local[b];
      });
    } else {
      histogram<D>(chunks, 0, nchunks, hi, lo, want, hist.data());
    }
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

// ---------------------------------------------------------------- fused select + mask
// Above kFastMin elements the threshold and the masks come from ONE pass over the data: a
// strided sample of S keys (a power of two near n / 64, in [2^12, 2^15]) brackets the k-th
// key, [lo, hi], with a wide safety margin;
// the pass (branch-free, vectorised) writes a byte per element, 1 above the bracket, 0 below,
// 2 inside, counts the keys below and inside, and, while each strip is still in L1, collects
// the few keys inside (with their offset in the chunk) and histograms them into kBins bins
// of the bracket. The bin holding rank k is then the only one whose keys need an exact
// selection, and a parallel fix-up sets the collected bytes to 0 or 1. The sample only
// decides speed, never the result: if the bracket misses rank k or holds too many keys
// (ties), the radix select and a plain mask pass run instead.
constexpr int64_t kFastMin = int64_t(1) << 16;
// Sample positions j * n / S in pooled order (S a power of two: a shift, not a division).
// Smaller inputs (one layer of a layer-wise call) take fewer samples: the gather and its
// selection would otherwise outweigh the pass.
constexpr int kSampleMinBits = 12, kSampleMaxBits = 15;
constexpr int kBinBits = 12;
static_assert(kChunk <= (int64_t(1) << 16), "offsets in a chunk are stored as uint16");

std::vector<Chunk> make_chunks(const std::vector<Segment>& segs, const std::vector<bool*>& outs) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    for (int64_t b = 0; b < s.n; b += kChunk) {
      chunks.push_back({s.data, b, std::min(kChunk, s.n - b), s.elem, outs[i]});
    }
  }
  return chunks;
}

template <Domain D>
typename DomainTraits<D>::Key key_at(const Segment& s, int64_t i) {
  typename DomainTraits<D>::Key key{};
  visit<D>(s.elem, [&](auto tag) {
    using T = decltype(tag);
    key = abs_key<D>(static_cast<const T*>(s.data)[i]);
  });
  return key;
}

template <Domain D>
void mask_by_key(const std::vector<Chunk>& chunks, int64_t cb, int64_t ce,
                 typename DomainTraits<D>::Key t) {
  for (int64_t c = cb; c < ce; ++c) {
    const Chunk& ch = chunks[c];
    visit<D>(ch.elem, [&](auto tag) {
      using T = decltype(tag);
      const T* p = static_cast<const T*>(ch.data) + ch.begin;
      bool* o = ch.out + ch.begin;
      for (int64_t i = 0; i < ch.len; ++i) o[i] = abs_key<D>(p[i]) >= t;
    });
  }
}

// Calls f(i) for every i < len with o[i] == 2. SSE2 looks at 64 bytes per test: about one
// element in 70 is inside, so most 64-byte blocks hold none and are skipped with one branch.
template <typename F>
inline void for_each_two(const uint8_t* o, int64_t len, F&& f) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128i two = _mm_set1_epi8(2);
  for (; i + 64 <= len; i += 64) {
    __m128i v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(o + i + 16 * j));
    // of the values 0, 1, 2 only 2 has bit 1 set
    const __m128i any = _mm_and_si128(_mm_or_si128(_mm_or_si128(v[0], v[1]), _mm_or_si128(v[2], v[3])), two);
    if (!_mm_movemask_epi8(_mm_cmpeq_epi8(any, two))) continue;
    uint64_t m = 0;
    for (int j = 0; j < 4; ++j) {
      m |= static_cast<uint64_t>(static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(v[j], two)))) << (16 * j);
    }
    while (m) {
      f(i + __builtin_ctzll(m));
      m &= m - 1;
    }
  }
#endif
  for (; i < len; ++i) {
    if (o[i] == 2) f(i);
  }
}

// The vectorised part of the pass over one strip. Keys have the sign bit clear, so they
// compare as signed integers, which SSE2/AVX2 do natively (unsigned compares need extra
// instructions and made this loop compute-bound). Returns the counts below and inside;
// `bad` gets any key at or above the non-finite bound.
template <Domain D, typename T>
SDCLR_FAST_HOT void bracket_strip(const T* __restrict__ p, uint8_t* __restrict__ o, int32_t len,
                                  std::make_signed_t<typename DomainTraits<D>::Key> lo,
                                  std::make_signed_t<typename DomainTraits<D>::Key> hi,
                                  int32_t* below_out, int32_t* inside_out, int32_t* bad_out) {
  using SKey = std::make_signed_t<typename DomainTraits<D>::Key>;
  constexpr SKey kBad = static_cast<SKey>(DomainTraits<D>::kNonFinite);
  int32_t below = 0, inside = 0, bad = 0;
  for (int32_t i = 0; i < len; ++i) {
    const SKey key = static_cast<SKey>(abs_key<D>(p[i]));
    const int32_t above = key > hi;
    const int32_t under = key < lo;
    const int32_t in = 1 - above - under;
    o[i] = static_cast<uint8_t>(above | (in << 1));
    below += under;
    inside += in;
    bad |= key >= kBad;
  }
  *below_out = below;
  *inside_out = inside;
  *bad_out = bad;
}

template <Domain D>
struct ChunkResult {
  int64_t below = 0, inside = 0;
  bool bad = false;
  std::vector<typename DomainTraits<D>::Key> keys;  // keys inside the bracket
  std::vector<uint16_t> where;                      // and their offsets in the chunk
};

// The fused pass over one chunk, strip by strip. `budget` bounds the keys collected over all
// chunks (tie-heavy data that fooled the sample): past it, collection stops and the caller
// falls back. `hist` (this thread's) counts the collected keys per bin, bin = (key-lo)>>shift.
template <Domain D, typename T>
void bracket_chunk(const T* p, uint8_t* o, int64_t len, typename DomainTraits<D>::Key lo,
                   typename DomainTraits<D>::Key hi, int shift, int64_t* hist,
                   ChunkResult<D>& res, std::atomic<int64_t>& budget) {
  using Key = typename DomainTraits<D>::Key;
  using SKey = std::make_signed_t<Key>;
  constexpr int64_t kStrip = 1 << 12;  // 16 KiB of float32: stays in L1 for the collection
  for (int64_t s0 = 0; s0 < len; s0 += kStrip) {
    const int64_t s1 = std::min(len, s0 + kStrip);
    int32_t below, inside, bad;
    bracket_strip<D, T>(p + s0, o + s0, static_cast<int32_t>(s1 - s0), static_cast<SKey>(lo),
                        static_cast<SKey>(hi), &below, &inside, &bad);
    res.below += below;
    res.inside += inside;
    res.bad = res.bad || bad;
    if (inside && budget.fetch_sub(inside, std::memory_order_relaxed) >= inside) {
      for_each_two(o + s0, s1 - s0, [&](int64_t i) {
        const Key key = abs_key<D>(p[s0 + i]);
        res.keys.push_back(key);
        res.where.push_back(static_cast<uint16_t>(s0 + i));
        ++hist[static_cast<Key>(key - lo) >> shift];
      });
    }
  }
}

// Runs f(begin, end) over [0, n) on every thread when parallel, else on this one.
template <typename F>
void maybe_parallel(bool parallel, int64_t n, F&& f) {
  if (parallel && n > 1) {
    at::parallel_for(0, n, 1, f);
  } else if (n > 0) {
    f(0, n);
  }
}

template <Domain D>
bool fused_select_and_mask(const std::vector<Segment>& segs, const std::vector<Chunk>& chunks,
                           int64_t n, int64_t k, bool parallel, const char* op,
                           typename DomainTraits<D>::Key* result) {
  using Key = typename DomainTraits<D>::Key;
  // 1. bracket from the sample: ranks r -+ (3.5 sigma + 8) of the sample's order statistics
  // (rank k falls outside about once in 2,000 calls, which only costs the fallback's time).
  // The strided reads miss the cache one by one, so the threads share them.
  std::vector<int64_t> seg_end(segs.size());
  for (size_t i = 0; i < segs.size(); ++i) seg_end[i] = (i ? seg_end[i - 1] : 0) + segs[i].n;
  int sample_bits = kSampleMinBits;
  while (sample_bits < kSampleMaxBits && (n >> (sample_bits + 1 + 6)) > 0) ++sample_bits;
  const int64_t samples = int64_t(1) << sample_bits;
  std::vector<Key> sample(samples);
  maybe_parallel(parallel, samples, [&](int64_t jb, int64_t je) {
    size_t si = std::upper_bound(seg_end.begin(), seg_end.end(), (jb * n) >> sample_bits) - seg_end.begin();
    for (int64_t j = jb; j < je; ++j) {
      const int64_t pos = (j * n) >> sample_bits;
      while (pos >= seg_end[si]) ++si;
      sample[j] = key_at<D>(segs[si], pos - (seg_end[si] - segs[si].n));
    }
  });
  const double q = static_cast<double>(k) / static_cast<double>(n);
  const double r = q * samples;
  const double d = 3.5 * std::sqrt(samples * q * (1.0 - q)) + 8.0;
  const int64_t lo_i = static_cast<int64_t>(std::floor(r - d));
  const int64_t hi_i = static_cast<int64_t>(std::ceil(r + d));
  Key lo = 0, hi = std::numeric_limits<Key>::max() >> 1;  // keys have the sign bit clear
  auto from = sample.begin();
  if (lo_i > 0) {
    std::nth_element(sample.begin(), sample.begin() + lo_i, sample.end());
    lo = sample[lo_i];
    from = sample.begin() + lo_i + 1;
  }
  if (hi_i < samples - 1) {
    std::nth_element(from, sample.begin() + hi_i, sample.end());
    hi = sample[hi_i];
  }
  const Key span = static_cast<Key>(hi - lo);
  int64_t in_sample = 0;
  for (Key key : sample) in_sample += static_cast<Key>(key - lo) <= span;
  if (in_sample * 8 > samples) return false;  // tie-heavy: the bracket would hold too much
  int shift = 0;
  while ((span >> shift) >= (Key(1) << kBinBits)) ++shift;
  const int64_t nbins = static_cast<int64_t>(span >> shift) + 1;

  // 2. the pass
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<ChunkResult<D>> per_chunk(nchunks);
  std::vector<int64_t> hist(nbins, 0);
  std::mutex merge;
  std::atomic<int64_t> budget{n / 4};
  const int64_t expect = 2 * kChunk * in_sample / samples + 64;  // collected keys per chunk
  maybe_parallel(parallel, nchunks, [&](int64_t cb, int64_t ce) {
    std::vector<int64_t> local(nbins, 0);
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      per_chunk[c].keys.reserve(expect);
      per_chunk[c].where.reserve(expect);
      visit<D>(ch.elem, [&](auto tag) {
        using T = decltype(tag);
        bracket_chunk<D>(static_cast<const T*>(ch.data) + ch.begin,
                         reinterpret_cast<uint8_t*>(ch.out + ch.begin), ch.len, lo, hi, shift,
                         local.data(), per_chunk[c], budget);
      });
    }
    std::lock_guard<std::mutex> g(merge);
    for (int64_t b = 0; b < nbins; ++b) hist[b] += local[b];
  });
  int64_t below = 0, inside = 0, collected = 0;
  bool bad = false;
  for (const auto& c : per_chunk) {
    below += c.below;
    inside += c.inside;
    collected += static_cast<int64_t>(c.keys.size());
    bad = bad || c.bad;
  }
  if (bad) {
    const int64_t bad_tensor = find_non_finite<D>(segs);
    TORCH_CHECK_VALUE(bad_tensor < 0, op, ": tensors[", bad_tensor,
                      "] contains NaN or inf; magnitude pruning needs finite weights");
  }
  if (collected != inside || k < below || k >= below + inside) return false;

  // 3. the bin holding rank k; the exact threshold among that bin's keys; then every
  // collected byte becomes 0 or 1
  int64_t rank = k - below, bin = 0;
  while (rank >= hist[bin]) rank -= hist[bin++];
  std::vector<Key> cand;
  cand.reserve(hist[bin]);
  for (const auto& c : per_chunk) {
    for (Key key : c.keys) {
      if ((static_cast<Key>(key - lo) >> shift) == static_cast<Key>(bin)) cand.push_back(key);
    }
  }
  std::nth_element(cand.begin(), cand.begin() + rank, cand.end());
  const Key t = cand[rank];
  maybe_parallel(parallel, nchunks, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      bool* o = chunks[c].out + chunks[c].begin;
      const auto& res = per_chunk[c];
      for (size_t i = 0; i < res.keys.size(); ++i) o[res.where[i]] = res.keys[i] >= t;
    }
  });
  *result = t;
  return true;
}

// Threshold key of rank k among segs and the masks key >= threshold written to outs.
template <Domain D>
typename DomainTraits<D>::Key select_and_mask(const std::vector<Segment>& segs,
                                             const std::vector<bool*>& outs, int64_t n,
                                             int64_t k, bool parallel, const char* op) {
  using Key = typename DomainTraits<D>::Key;
  const std::vector<Chunk> chunks = make_chunks(segs, outs);
  Key t{};
  if (n >= kFastMin && fused_select_and_mask<D>(segs, chunks, n, k, parallel, op, &t)) return t;
  t = select_key<D>(segs, n, k, op, parallel);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (parallel && nchunks > 1) {
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) { mask_by_key<D>(chunks, cb, ce, t); });
  } else {
    mask_by_key<D>(chunks, 0, nchunks, t);
  }
  return t;
}

// Runs f(i, parallel) for every non-empty segment. Segments above a fair share of the work
// get every thread in turn (parallel = true); the rest (all layers of a ResNet) run one per
// thread, largest first from a shared queue, so that a layer-wise call costs one parallel
// region instead of one per layer and pass.
template <typename F>
void run_per_tensor(const std::vector<Segment>& segs, F&& f) {
  int64_t total = 0;
  for (const auto& s : segs) total += s.n;
  const int64_t threads = std::max(1, at::get_num_threads());
  std::vector<int64_t> small;
  for (int64_t i = 0; i < static_cast<int64_t>(segs.size()); ++i) {
    const int64_t n = segs[i].n;
    if (n == 0) continue;
    if (threads > 1 && n * threads > total && n >= 2 * kChunk) {
      f(i, true);
    } else {
      small.push_back(i);
    }
  }
  std::stable_sort(small.begin(), small.end(),
                   [&](int64_t a, int64_t b) { return segs[a].n > segs[b].n; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, static_cast<int64_t>(small.size())), 1,
                   [&](int64_t, int64_t) {
    for (int64_t j = next++; j < static_cast<int64_t>(small.size()); j = next++) f(small[j], false);
  });
}

at::Tensor kth_abs_value_cpu(at::TensorList tensors, int64_t k) {
  const char* op = "kth_abs_value";
  const Prepared p = prepare(tensors, op, c10::DeviceType::CPU);
  const std::vector<Segment> segs = segments(p);
  int64_t n = 0;
  for (const auto& s : segs) n += s.n;
  check_pooled_rank(op, n, k);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(threshold_dtype(p.domain)));
  dispatch_domain(p.domain, [&](auto dc) {
    constexpr Domain D = decltype(dc)::value;
    using V = typename DomainTraits<D>::Value;
    *out.data_ptr<V>() = key_value<D>(select_key<D>(segs, n, k, op, /*parallel=*/true));
  });
  return out;
}

at::Tensor kth_abs_value_per_tensor_cpu(at::TensorList tensors, at::IntArrayRef k) {
  const char* op = "kth_abs_value_per_tensor";
  const Prepared p = prepare(tensors, op, c10::DeviceType::CPU);
  const std::vector<Segment> segs = segments(p);
  const int64_t g = static_cast<int64_t>(segs.size());
  check_rank_count(op, g, k.size());
  for (int64_t i = 0; i < g; ++i) check_tensor_rank(op, i, segs[i].n, k[i]);
  at::Tensor out = at::zeros({g}, at::TensorOptions().dtype(threshold_dtype(p.domain)));
  dispatch_domain(p.domain, [&](auto dc) {
    constexpr Domain D = decltype(dc)::value;
    using V = typename DomainTraits<D>::Value;
    V* o = out.data_ptr<V>();
    run_per_tensor(segs, [&](int64_t i, bool parallel) {
      o[i] = key_value<D>(select_key<D>({segs[i]}, segs[i].n, k[i], op, parallel));
    });
  });
  return out;
}

std::vector<at::Tensor> abs_ge_masks_cpu(at::TensorList tensors, const at::Tensor& threshold) {
  const char* op = "abs_ge_masks";
  const Prepared p = prepare(tensors, op, c10::DeviceType::CPU);
  const std::vector<Segment> segs = segments(p);
  const int64_t g = static_cast<int64_t>(segs.size());
  check_threshold(op, threshold, at::Device(at::kCPU), g);
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
    for (int64_t b = 0; b < segs[i].n; b += kChunk) {
      chunks.push_back({i, b, std::min(kChunk, segs[i].n - b), o});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const MaskChunk& ch = chunks[c];
      const Segment& s = segs[ch.seg];
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

std::tuple<at::Tensor, std::vector<at::Tensor>> topk_abs_masks_cpu(at::TensorList tensors,
                                                                   at::IntArrayRef k,
                                                                   bool per_tensor) {
  const char* op = "topk_abs_masks";
  const Prepared p = prepare(tensors, op, c10::DeviceType::CPU);
  const std::vector<Segment> segs = segments(p);
  const int64_t g = static_cast<int64_t>(segs.size());
  std::vector<at::Tensor> masks;
  std::vector<bool*> outs;
  for (int64_t i = 0; i < g; ++i) {
    masks.push_back(at::empty(tensors[i].sizes(), at::TensorOptions().dtype(at::kBool)));
    outs.push_back(masks.back().data_ptr<bool>());
  }
  const auto tdtype = at::TensorOptions().dtype(threshold_dtype(p.domain));
  if (!per_tensor) {
    TORCH_CHECK_VALUE(k.size() == 1, op, ": k must hold one rank when per_tensor is false, got ",
                      k.size());
    int64_t n = 0;
    for (const auto& s : segs) n += s.n;
    check_pooled_rank(op, n, k[0]);
    at::Tensor thr = at::empty({1}, tdtype);
    dispatch_domain(p.domain, [&](auto dc) {
      constexpr Domain D = decltype(dc)::value;
      using V = typename DomainTraits<D>::Value;
      *thr.data_ptr<V>() = key_value<D>(select_and_mask<D>(segs, outs, n, k[0], true, op));
    });
    return {thr, masks};
  }
  check_rank_count(op, g, k.size());
  for (int64_t i = 0; i < g; ++i) check_tensor_rank(op, i, segs[i].n, k[i]);
  at::Tensor thr = at::zeros({g}, tdtype);
  dispatch_domain(p.domain, [&](auto dc) {
    constexpr Domain D = decltype(dc)::value;
    using V = typename DomainTraits<D>::Value;
    V* o = thr.data_ptr<V>();
    run_per_tensor(segs, [&](int64_t i, bool parallel) {
      o[i] = key_value<D>(select_and_mask<D>({segs[i]}, {outs[i]}, segs[i].n, k[i], parallel, op));
    });
  });
  return {thr, masks};
}

}  // namespace
}  // namespace sdclr_fast

TORCH_LIBRARY(sdclr_fast, m) {
  m.def("kth_abs_value(Tensor[] tensors, int k) -> Tensor");
  m.def("kth_abs_value_per_tensor(Tensor[] tensors, int[] k) -> Tensor");
  m.def("abs_ge_masks(Tensor[] tensors, Tensor threshold) -> Tensor[]");
  m.def("topk_abs_masks(Tensor[] tensors, int[] k, bool per_tensor) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(sdclr_fast, CPU, m) {
  m.impl("kth_abs_value", &sdclr_fast::kth_abs_value_cpu);
  m.impl("kth_abs_value_per_tensor", &sdclr_fast::kth_abs_value_per_tensor_cpu);
  m.impl("abs_ge_masks", &sdclr_fast::abs_ge_masks_cpu);
  m.impl("topk_abs_masks", &sdclr_fast::topk_abs_masks_cpu);
}

// Importing sdclr_fast._C runs the registrations above (and those of prune_cuda.cu where the
// CUDA part is built); the module itself exports nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sdclr_fast C++/CUDA ops; use them through torch.ops.sdclr_fast or sdclr_fast.ops";
}
