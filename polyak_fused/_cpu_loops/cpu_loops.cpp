// The foreach path's passes over memory on the CPU, each one loop over all tensors.
//
// On the CPU every torch op is one pass over memory, so a step built from torch._foreach_* ops
// makes as many passes as it has ops (MoMo-Adam about 15). Each function here is one pass: it
// reads every tensor it needs once per element and writes each output once. What the passes
// compute, and why, is written in the methods' `_foreach_<method>` functions that call them
// (polyak_fused/*.py); this file only says which element-wise expression each pass evaluates.
//
// Conventions, the same as the torch ops they replace (polyak_fused/_foreach.py):
//   * precision: per-element math in float for float32/bfloat16/float16 tensors, in double for
//     float64 ones; each low-precision tensor is read and rounded once;
//   * sums: each chunk of CHUNK elements is summed in LANES independent accumulators of the
//     math type, and the chunks are added in double, in chunk order: the result does not depend
//     on the thread count;
//   * the tensors of one index (x, its gradient, its state) are dense CPU tensors (contiguous, or
//     a permutation of contiguous memory, such as a transposed matrix) with one dtype, shape and
//     strides: each is then numel() elements from data_ptr(), in the same order for all of them.
//     `refusal` says whether a call's lists are such (the caller asks first, _cpu_loops.
//     for_tensors); every pass checks again before it reads anything, and raises ValueError.
//   * coefficients come as Python floats (double), are cast to the math type once, and are per
//     tensor where a param group's lr enters them.
// Work is split in chunks over at::parallel_for, so it uses torch's intra-op threads
// (torch.set_num_threads).

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int64_t CHUNK = 1 << 16;  // elements per unit of work and per partial sum
constexpr int LANES = 32;  // accumulators per sum (vectorized; 16: an 8M sum took 25% longer)

template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };

// One list argument: a tensor per index, or nullptr where the Python list holds None.
struct List {
  std::vector<at::Tensor> tensors;
  std::vector<char> present;
};

struct BadArgument : std::runtime_error {
  using std::runtime_error::runtime_error;
};

List parse_list(PyObject* obj, const char* name, bool allow_none) {
  PyObject* fast = PySequence_Fast(obj, "expected a sequence of tensors");
  if (!fast) throw BadArgument(std::string(name) + " must be a sequence of tensors");
  List out;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out.tensors.resize(n);
  out.present.resize(n, 1);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(fast, i);
    if (item == Py_None && allow_none) {
      out.present[i] = 0;
      continue;
    }
    if (!THPVariable_Check(item)) {
      Py_DECREF(fast);
      throw BadArgument(std::string(name) + "[" + std::to_string(i) + "] is not a tensor");
    }
    out.tensors[i] = THPVariable_Unpack(item);
  }
  Py_DECREF(fast);
  return out;
}

List absent(size_t n) {  // a list argument given as None: no tensor at any index
  List out;
  out.tensors.resize(n);
  out.present.resize(n, 0);
  return out;
}

std::vector<double> parse_floats(PyObject* obj, const char* name, size_t n) {
  PyObject* fast = PySequence_Fast(obj, "expected a sequence of floats");
  if (!fast) throw BadArgument(std::string(name) + " must be a sequence of floats");
  std::vector<double> out(PySequence_Fast_GET_SIZE(fast));
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
  Py_DECREF(fast);
  if (PyErr_Occurred()) throw BadArgument(std::string(name) + " holds a value that is not a float");
  if (out.size() != n)
    throw BadArgument(std::string(name) + " has " + std::to_string(out.size()) +
                      " values for " + std::to_string(n) + " tensors");
  return out;
}

// The lists of one call, checked: at each index every present tensor is a contiguous CPU tensor
// of the first list's dtype (float32, float64, bfloat16 or float16) and size.
struct Lists {
  std::vector<List> lists;
  size_t n = 0;

  Lists(std::initializer_list<std::pair<List, const char*>> named) {
    std::vector<List> given;
    const char* names[8];
    for (const auto& [list, name] : named) {
      names[given.size()] = name;
      given.push_back(list);
    }
    check(given, names);
  }

  Lists(const std::vector<List>& given, const char* const* names) { check(given, names); }

  void check(const std::vector<List>& given, const char* const* names) {
    lists = given;
    n = lists[0].tensors.size();
    for (size_t j = 1; j < lists.size(); ++j)
      if (lists[j].tensors.size() != n)
        throw BadArgument(std::string(names[j]) + " has " +
                          std::to_string(lists[j].tensors.size()) + " tensors, " + names[0] +
                          " " + std::to_string(n));
    for (size_t i = 0; i < n; ++i) {
      if (!lists[0].present[i]) throw BadArgument(std::string(names[0]) + " holds None");
      const at::Tensor& lead = lists[0].tensors[i];
      for (size_t j = 0; j < lists.size(); ++j) {
        if (!lists[j].present[i]) continue;
        const at::Tensor& t = lists[j].tensors[i];
        const std::string where = std::string(names[j]) + "[" + std::to_string(i) + "]";
        if (!t.device().is_cpu() || t.layout() != at::kStrided || !t.has_storage())
          throw BadArgument(where + " is not a dense CPU tensor");
        if (t.key_set().has(c10::DispatchKey::Python))
          throw BadArgument(where + " is a tensor subclass with __torch_dispatch__");
        if (!t.is_non_overlapping_and_dense() || (t.numel() > 0 && t.const_data_ptr() == nullptr))
          throw BadArgument(where + " is not a dense CPU tensor");
        const auto s = t.scalar_type();
        if (s != at::kFloat && s != at::kDouble && s != at::kBFloat16 && s != at::kHalf)
          throw BadArgument(where + " has dtype " + std::string(c10::toString(s)));
        if (s != lead.scalar_type() || t.sizes() != lead.sizes() || t.strides() != lead.strides())
          throw BadArgument(where + " differs in dtype, shape or strides from " + names[0] + "[" +
                            std::to_string(i) + "]");
      }
    }
  }

  const at::Tensor& at(size_t list, size_t i) const { return lists[list].tensors[i]; }
  bool has(size_t list, size_t i) const {
    return list < lists.size() && lists[list].present[i];
  }
};

struct Chunk {
  size_t index;
  int64_t start, length;
};

std::vector<Chunk> chunks_of(const Lists& ls) {
  std::vector<Chunk> out;
  for (size_t i = 0; i < ls.n; ++i) {
    const int64_t n = ls.at(0, i).numel();
    for (int64_t s = 0; s < n; s += CHUNK) out.push_back({i, s, std::min(CHUNK, n - s)});
  }
  return out;
}

// Calls body(tag, chunk) for every chunk in parallel; tag carries the chunk's element type.
template <typename T> struct Tag { using type = T; };

template <typename Body>
void for_chunks(const Lists& ls, const std::vector<Chunk>& chunks, Body body) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      switch (ls.at(0, ch.index).scalar_type()) {
        case at::kFloat: body(Tag<float>{}, ch); break;
        case at::kDouble: body(Tag<double>{}, ch); break;
        case at::kBFloat16: body(Tag<c10::BFloat16>{}, ch); break;
        case at::kHalf: body(Tag<c10::Half>{}, ch); break;
        default: break;  // (refused by Lists)
      }
    }
  });
}

template <typename T>
T* data(const Lists& ls, size_t list, const Chunk& ch) {
  if (!ls.has(list, ch.index)) return nullptr;
  return static_cast<T*>(ls.at(list, ch.index).data_ptr()) + ch.start;
}

// Sums of NS terms over n elements: term(i, v) writes the NS terms of element i into v. Each
// lane adds FOLD / LANES terms in the math type, then goes into a double (so a float32 lane never
// adds more than 32 terms: the sums are within about 1e-6 of float64, where whole-chunk float32
// lanes were 4e-6 off).
template <typename M, int NS, typename Term>
void accumulate(int64_t n, Term term, double* out) {
  constexpr int64_t FOLD = 1024;
  double wide[NS][LANES] = {};
  int64_t i = 0;
  while (i + LANES <= n) {
    M acc[NS][LANES] = {};
    const int64_t end = std::min(n - n % LANES, i + FOLD);
    for (; i < end; i += LANES) {
      for (int l = 0; l < LANES; ++l) {
        M v[NS];
        term(i + l, v);
        for (int s = 0; s < NS; ++s) acc[s][l] += v[s];
      }
    }
    for (int s = 0; s < NS; ++s)
      for (int l = 0; l < LANES; ++l) wide[s][l] += acc[s][l];
  }
  for (; i < n; ++i) {
    M v[NS];
    term(i, v);
    for (int s = 0; s < NS; ++s) wide[s][0] += v[s];
  }
  for (int s = 0; s < NS; ++s) {
    double total = 0;
    for (int l = 0; l < LANES; ++l) total += wide[s][l];
    out[s] = total;
  }
}

// Runs a sum pass: partial(tag, chunk, out) adds the chunk's NS sums into out; returns the NS
// totals, the chunks added in order.
template <int NS, typename Partial>
std::vector<double> sum_pass(const Lists& ls, Partial partial) {
  const auto chunks = chunks_of(ls);
  std::vector<double> parts(chunks.size() * NS, 0.0);
  for_chunks(ls, chunks, [&](auto tag, const Chunk& ch) {
    partial(tag, ch, &parts[(&ch - chunks.data()) * NS]);
  });
  std::vector<double> total(NS, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c)
    for (int s = 0; s < NS; ++s) total[s] += parts[c * NS + s];
  return total;
}

// Written tensors: their version counters move, as an in-place torch op's would.
void bump(const Lists& ls, std::initializer_list<size_t> written) {
  for (size_t list : written)
    for (size_t i = 0; i < ls.n; ++i)
      if (ls.has(list, i)) torch::autograd::impl::bump_version(ls.at(list, i));
}

PyObject* tuple_of(const std::vector<double>& v) {
  PyObject* out = PyTuple_New(v.size());
  for (size_t i = 0; i < v.size(); ++i) PyTuple_SET_ITEM(out, i, PyFloat_FromDouble(v[i]));
  return out;
}

template <typename F>
PyObject* guarded(F f) {
  try {
    return f();
  } catch (const BadArgument& e) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// refusal(*lists) -> None | str: None if the passes take these lists (as the arguments of one
// call; an entry may be None), else why not.
PyObject* refusal(PyObject*, PyObject* args) {
  try {
    const Py_ssize_t k = PyTuple_GET_SIZE(args);
    if (k < 1 || k > 8) throw BadArgument("refusal takes 1 to 8 lists");
    std::vector<List> lists;
    for (Py_ssize_t j = 0; j < k; ++j)
      lists.push_back(parse_list(PyTuple_GET_ITEM(args, j), "list", true));
    static const char* names[8] = {"list 0", "list 1", "list 2", "list 3",
                                   "list 4", "list 5", "list 6", "list 7"};
    Lists check(lists, names);
    Py_RETURN_NONE;
  } catch (const std::exception& e) {  // (BadArgument, or torch refusing a tensor subclass)
    PyErr_Clear();
    return PyUnicode_FromString(e.what());
  }
}

// ---- the passes -----------------------------------------------------------------------------

// sum_sq(ts) -> float: sum_i ||t_i||^2.
PyObject* sum_sq(PyObject*, PyObject* args) {
  PyObject* ts;
  if (!PyArg_ParseTuple(args, "O", &ts)) return nullptr;
  return guarded([&] {
    Lists ls({{parse_list(ts, "ts", false), "ts"}});
    auto total = sum_pass<1>(ls, [&](auto tag, const Chunk& ch, double* out) {
      using T = typename decltype(tag)::type;
      using M = typename MathOf<T>::type;
      const T* t = data<T>(ls, 0, ch);
      accumulate<M, 1>(ch.length, [&](int64_t i, M* v) { M a = t[i]; v[0] = a * a; }, out);
    });
    return PyFloat_FromDouble(total[0]);
  });
}

// dog_sums(xs, x0s, gs, g_scale, weight_decay) -> (sum ||x - x0||^2, sum ||x0||^2, sum ||d||^2)
// with d = g_scale g + weight_decay x (g_scale g when weight_decay is 0); where gs[i] is None,
// index i adds nothing to the third.
PyObject* dog_sums(PyObject*, PyObject* args) {
  PyObject *xs, *x0s, *gs;
  double g_scale, weight_decay;
  if (!PyArg_ParseTuple(args, "OOOdd", &xs, &x0s, &gs, &g_scale, &weight_decay)) return nullptr;
  return guarded([&] {
    Lists ls({{parse_list(xs, "xs", false), "xs"}, {parse_list(x0s, "x0s", false), "x0s"},
              {parse_list(gs, "gs", true), "gs"}});
    auto total = sum_pass<3>(ls, [&](auto tag, const Chunk& ch, double* out) {
      using T = typename decltype(tag)::type;
      using M = typename MathOf<T>::type;
      const T *x = data<T>(ls, 0, ch), *x0 = data<T>(ls, 1, ch), *g = data<T>(ls, 2, ch);
      const M gs_ = static_cast<M>(g_scale), wd = static_cast<M>(weight_decay);
      if (g && weight_decay != 0) {
        accumulate<M, 3>(ch.length, [&](int64_t i, M* v) {
          M xi = x[i], x0i = x0[i], gap = xi - x0i, d = gs_ * static_cast<M>(g[i]) + wd * xi;
          v[0] = gap * gap; v[1] = x0i * x0i; v[2] = d * d;
        }, out);
      } else if (g) {
        accumulate<M, 3>(ch.length, [&](int64_t i, M* v) {
          M x0i = x0[i], gap = static_cast<M>(x[i]) - x0i, d = gs_ * static_cast<M>(g[i]);
          v[0] = gap * gap; v[1] = x0i * x0i; v[2] = d * d;
        }, out);
      } else {
        accumulate<M, 2>(ch.length, [&](int64_t i, M* v) {
          M x0i = x0[i], gap = static_cast<M>(x[i]) - x0i;
          v[0] = gap * gap; v[1] = x0i * x0i;
        }, out);
      }
    });
    return tuple_of(total);
  });
}

// axpy(xs, ds, a, pre): x_i <- pre_i x_i + a_i d_i.
PyObject* axpy(PyObject*, PyObject* args) {
  PyObject *xs, *ds, *a_obj, *pre_obj;
  if (!PyArg_ParseTuple(args, "OOOO", &xs, &ds, &a_obj, &pre_obj)) return nullptr;
  return guarded([&] {
    Lists ls({{parse_list(xs, "xs", false), "xs"}, {parse_list(ds, "ds", false), "ds"}});
    const auto a = parse_floats(a_obj, "a", ls.n), pre = parse_floats(pre_obj, "pre", ls.n);
    for_chunks(ls, chunks_of(ls), [&](auto tag, const Chunk& ch) {
      using T = typename decltype(tag)::type;
      using M = typename MathOf<T>::type;
      T* x = data<T>(ls, 0, ch);
      const T* d = data<T>(ls, 1, ch);
      const M ai = static_cast<M>(a[ch.index]), pi = static_cast<M>(pre[ch.index]);
      for (int64_t i = 0; i < ch.length; ++i)
        x[i] = static_cast<T>(pi * static_cast<M>(x[i]) + ai * static_cast<M>(d[i]));
    });
    bump(ls, {0});
    Py_RETURN_NONE;
  });
}

// The new average of a momentum method: m' = b (seed ? g' : m) + w g', g' = g_scale g.
template <typename M>
struct Average {
  M b, w, g_scale;
  bool seed;
  M grad(M g) const { return g_scale * g; }
  M next(M m, M g1) const { return b * (seed ? g1 : m) + w * g1; }
};

// momentum_sums(xs, ms, gs, b, w, g_scale, seed) -> (sum <g', x>, sum <m', x>, sum ||m'||^2);
// xs may be None (the first two are then 0 and x is not read).
PyObject* momentum_sums(PyObject*, PyObject* args) {
  PyObject *xs, *ms, *gs;
  double b, w, g_scale;
  int seed;
  if (!PyArg_ParseTuple(args, "OOOdddp", &xs, &ms, &gs, &b, &w, &g_scale, &seed)) return nullptr;
  return guarded([&] {
    List m_list = parse_list(ms, "ms", false), g_list = parse_list(gs, "gs", false);
    List x_list = xs != Py_None ? parse_list(xs, "xs", false) : absent(m_list.tensors.size());
    Lists ls({{m_list, "ms"}, {g_list, "gs"}, {x_list, "xs"}});
    auto total = sum_pass<3>(ls, [&](auto tag, const Chunk& ch, double* out) {
      using T = typename decltype(tag)::type;
      using M = typename MathOf<T>::type;
      const Average<M> avg{static_cast<M>(b), static_cast<M>(w), static_cast<M>(g_scale),
                           static_cast<bool>(seed)};
      const T *m = data<T>(ls, 0, ch), *g = data<T>(ls, 1, ch), *x = data<T>(ls, 2, ch);
      if (x) {
        accumulate<M, 3>(ch.length, [&](int64_t i, M* v) {
          M g1 = avg.grad(g[i]), m1 = avg.next(m[i], g1), xi = x[i];
          v[0] = g1 * xi; v[1] = m1 * xi; v[2] = m1 * m1;
        }, out);
      } else {
        double one[1];
        accumulate<M, 1>(ch.length, [&](int64_t i, M* v) {
          M m1 = avg.next(m[i], avg.grad(g[i]));
          v[0] = m1 * m1;
        }, one);
        out[2] = one[0];
      }
    });
    return tuple_of(total);
  });
}

// momentum_update(xs, ms, gs, b, w, g_scale, seed, a, div): m_i <- m', x_i <- (x_i + a_i m') /
// div_i (m' as in momentum_sums).
PyObject* momentum_update(PyObject*, PyObject* args) {
  PyObject *xs, *ms, *gs, *a_obj, *div_obj;
  double b, w, g_scale;
  int seed;
  if (!PyArg_ParseTuple(args, "OOOdddpOO", &xs, &ms, &gs, &b, &w, &g_scale, &seed, &a_obj,
                        &div_obj))
    return nullptr;
  return guarded([&] {
    Lists ls({{parse_list(xs, "xs", false), "xs"}, {parse_list(ms, "ms", false), "ms"},
              {parse_list(gs, "gs", false), "gs"}});
    const auto a = parse_floats(a_obj, "a", ls.n), div = parse_floats(div_obj, "div", ls.n);
    for_chunks(ls, chunks_of(ls), [&](auto tag, const Chunk& ch) {
      using T = typename decltype(tag)::type;
      using M = typename MathOf<T>::type;
      const Average<M> avg{static_cast<M>(b), static_cast<M>(w), static_cast<M>(g_scale),
                           static_cast<bool>(seed)};
      T *x = data<T>(ls, 0, ch), *m = data<T>(ls, 1, ch);
      const T* g = data<T>(ls, 2, ch);
      const M ai = static_cast<M>(a[ch.index]), di = static_cast<M>(div[ch.index]);
      if (di == M(1)) {
        for (int64_t i = 0; i < ch.length; ++i) {
          M m1 = avg.next(m[i], avg.grad(g[i]));
          m[i] = static_cast<T>(m1);
          x[i] = static_cast<T>(static_cast<M>(x[i]) + ai * m1);
        }
      } else {
        for (int64_t i = 0; i < ch.length; ++i) {
          M m1 = avg.next(m[i], avg.grad(g[i]));
          m[i] = static_cast<T>(m1);
          x[i] = static_cast<T>((static_cast<M>(x[i]) + ai * m1) / di);
        }
      }
    });
    bump(ls, {0, 1});
    Py_RETURN_NONE;
  });
}

// MoMo-Adam's moments: d' = d + (1 - b1) (g' - d), v' = b2 v + (1 - b2) g'^2,
// D = sqrt(v' / bias2) + eps, g' = g_scale g.
template <typename M>
struct Moments {
  M b1, b2, g_scale, bias2, eps;
  M grad(M g) const { return g_scale * g; }
  M first(M d, M g1) const { return d + (M(1) - b1) * (g1 - d); }
  M second(M v, M g1) const { return b2 * v + (M(1) - b2) * g1 * g1; }
  M denominator(M v1) const { return std::sqrt(v1 / bias2) + eps; }
};

// adam_sums(xs, ds, vs, gs, b1, b2, g_scale, bias2, eps)
//   -> (sum <g', x>, sum <d', x>, sum d'^2 / D).
PyObject* adam_sums(PyObject*, PyObject* args) {
  PyObject *xs, *ds, *vs, *gs;
  double b1, b2, g_scale, bias2, eps;
  if (!PyArg_ParseTuple(args, "OOOOddddd", &xs, &ds, &vs, &gs, &b1, &b2, &g_scale, &bias2, &eps))
    return nullptr;
  return guarded([&] {
    Lists ls({{parse_list(xs, "xs", false), "xs"}, {parse_list(ds, "ds", false), "ds"},
              {parse_list(vs, "vs", false), "vs"}, {parse_list(gs, "gs", false), "gs"}});
    auto total = sum_pass<3>(ls, [&](auto tag, const Chunk& ch, double* out) {
      using T = typename decltype(tag)::type;
      using M = typename MathOf<T>::type;
      const Moments<M> mo{static_cast<M>(b1), static_cast<M>(b2), static_cast<M>(g_scale),
                          static_cast<M>(bias2), static_cast<M>(eps)};
      const T *x = data<T>(ls, 0, ch), *d = data<T>(ls, 1, ch), *v = data<T>(ls, 2, ch),
              *g = data<T>(ls, 3, ch);
      accumulate<M, 3>(ch.length, [&](int64_t i, M* s) {
        M g1 = mo.grad(g[i]), d1 = mo.first(d[i], g1), xi = x[i];
        M D = mo.denominator(mo.second(v[i], g1));
        s[0] = g1 * xi; s[1] = d1 * xi; s[2] = d1 * (d1 / D);
      }, out);
    });
    return tuple_of(total);
  });
}

// adam_update(xs, ds, vs, gs, b1, b2, g_scale, bias2, eps, a, pre, div): d_i <- d', v_i <- v',
// x_i <- (pre_i x_i + a_i d' / D) / div_i.
PyObject* adam_update(PyObject*, PyObject* args) {
  PyObject *xs, *ds, *vs, *gs, *a_obj, *pre_obj, *div_obj;
  double b1, b2, g_scale, bias2, eps;
  if (!PyArg_ParseTuple(args, "OOOOdddddOOO", &xs, &ds, &vs, &gs, &b1, &b2, &g_scale, &bias2,
                        &eps, &a_obj, &pre_obj, &div_obj))
    return nullptr;
  return guarded([&] {
    Lists ls({{parse_list(xs, "xs", false), "xs"}, {parse_list(ds, "ds", false), "ds"},
              {parse_list(vs, "vs", false), "vs"}, {parse_list(gs, "gs", false), "gs"}});
    const auto a = parse_floats(a_obj, "a", ls.n), pre = parse_floats(pre_obj, "pre", ls.n),
               div = parse_floats(div_obj, "div", ls.n);
    for_chunks(ls, chunks_of(ls), [&](auto tag, const Chunk& ch) {
      using T = typename decltype(tag)::type;
      using M = typename MathOf<T>::type;
      const Moments<M> mo{static_cast<M>(b1), static_cast<M>(b2), static_cast<M>(g_scale),
                          static_cast<M>(bias2), static_cast<M>(eps)};
      T *x = data<T>(ls, 0, ch), *d = data<T>(ls, 1, ch), *v = data<T>(ls, 2, ch);
      const T* g = data<T>(ls, 3, ch);
      const M ai = static_cast<M>(a[ch.index]), pi = static_cast<M>(pre[ch.index]),
              di = static_cast<M>(div[ch.index]);
      for (int64_t i = 0; i < ch.length; ++i) {
        M g1 = mo.grad(g[i]), d1 = mo.first(d[i], g1), v1 = mo.second(v[i], g1);
        d[i] = static_cast<T>(d1);
        v[i] = static_cast<T>(v1);
        x[i] = static_cast<T>((pi * static_cast<M>(x[i]) + ai * (d1 / mo.denominator(v1))) / di);
      }
    });
    bump(ls, {0, 1, 2});
    Py_RETURN_NONE;
  });
}

PyMethodDef methods[] = {
    {"refusal", refusal, METH_VARARGS, "None if the passes take these lists, else why not"},
    {"sum_sq", sum_sq, METH_VARARGS, "sum_i ||t_i||^2 over a list of tensors"},
    {"dog_sums", dog_sums, METH_VARARGS, "DoG's three sums in one pass"},
    {"axpy", axpy, METH_VARARGS, "x_i <- pre_i x_i + a_i d_i"},
    {"momentum_sums", momentum_sums, METH_VARARGS, "the sums of a momentum step"},
    {"momentum_update", momentum_update, METH_VARARGS, "the update of a momentum step"},
    {"adam_sums", adam_sums, METH_VARARGS, "the sums of a MoMo-Adam step"},
    {"adam_update", adam_update, METH_VARARGS, "the update of a MoMo-Adam step"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_polyak_cpu_loops", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__polyak_cpu_loops() { return PyModule_Create(&module); }
