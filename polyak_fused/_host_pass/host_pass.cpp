// The per-tensor work of a fused step on the host, in C++: two loops that Python runs at
// 60-120 ns a tensor (each .grad, each data_ptr() goes through torch's Python bindings) and
// that take 5-15 ns a tensor here, reading the tensors' C++ objects directly.
//
// The semantics are those of reference.py, line for line (tests/test_host_pass.py holds the two
// to equal results on random cases); read that file first. The module is compiled on first use
// against the installed torch (build.py) and never raises for a case it cannot decide: it
// answers "not the same" (None, or 2), and the caller's Python path then looks, and raises if
// something is wrong.

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

namespace {

// A tensor whose C++ object this module may read: a torch.Tensor or nn.Parameter (a subclass
// may override .grad in Python; the caller handles those).
inline bool exact_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }

// Any tensor, subclasses included; the type of the last tensor seen is cached in `ok`.
inline bool any_tensor(PyObject* obj, PyTypeObject*& ok) {
  PyTypeObject* tp = Py_TYPE(obj);
  if (tp == ok) return true;
  try {
    if (!THPVariable_Check(obj)) return false;
  } catch (...) {
    PyErr_Clear();
    return false;
  }
  ok = tp;
  return true;
}

inline int64_t address(const at::Tensor& t) {
  return reinterpret_cast<int64_t>(t.const_data_ptr());
}

// grads_of_groups(group_params, expected, counts, whole=False) -> list | None
//
// The .grad of every parameter that has one, in param-group order, if those parameters are
// exactly `expected` (a tuple, compared by identity) and group k holds counts[k] of them; else
// None. With `whole`, every parameter is listed, None for one without a gradient, and at least
// one must have a gradient.
PyObject* grads_of_groups(PyObject*, PyObject* args) {
  PyObject *groups, *expected, *counts;
  int whole = 0;
  if (!PyArg_ParseTuple(args, "OO!O!|p", &groups, &PyTuple_Type, &expected, &PyTuple_Type,
                        &counts, &whole))
    return nullptr;
  PyObject* groups_fast = PySequence_Fast(groups, "group_params must be a sequence");
  if (!groups_fast) return nullptr;
  const Py_ssize_t n_groups = PySequence_Fast_GET_SIZE(groups_fast);
  const Py_ssize_t n = PyTuple_GET_SIZE(expected);
  PyObject* out = PyList_New(n);
  if (!out) {
    Py_DECREF(groups_fast);
    return nullptr;
  }
  static PyObject* grad_name = PyUnicode_InternFromString("grad");
  bool same = n_groups == PyTuple_GET_SIZE(counts);
  bool any_grad = false;
  Py_ssize_t j = 0;
  for (Py_ssize_t k = 0; same && k < n_groups; k++) {
    PyObject* ps = PySequence_Fast(PySequence_Fast_GET_ITEM(groups_fast, k), "params");
    if (!ps) {
      PyErr_Clear();
      same = false;
      break;
    }
    const Py_ssize_t m = PySequence_Fast_GET_SIZE(ps);
    PyObject** items = PySequence_Fast_ITEMS(ps);
    const Py_ssize_t start = j;
    for (Py_ssize_t i = 0; same && i < m; i++) {
      PyObject* p = items[i];
      PyObject* g;
      if (exact_tensor(p)) {
        const at::Tensor& grad = THPVariable_Unpack(p).grad();
        g = grad.defined() ? THPVariable_Wrap(grad) : Py_NewRef(Py_None);
      } else {
        g = PyObject_GetAttr(p, grad_name);  // a subclass: its own .grad
      }
      if (!g) {
        PyErr_Clear();
        same = false;
      } else if (g == Py_None && !whole) {
        Py_DECREF(g);
      } else if (j < n && PyTuple_GET_ITEM(expected, j) == p) {
        any_grad = any_grad || g != Py_None;
        PyList_SET_ITEM(out, j++, g);  // steals the reference
      } else {
        Py_DECREF(g);
        same = false;
      }
    }
    Py_DECREF(ps);
    if (same) {
      const long long want = PyLong_AsLongLong(PyTuple_GET_ITEM(counts, k));
      same = !PyErr_Occurred() && want == static_cast<long long>(j - start);
      PyErr_Clear();
    }
  }
  Py_DECREF(groups_fast);
  if (!same || j != n || !any_grad) {
    Py_DECREF(out);  // (unset items are NULL, which list deallocation skips)
    Py_RETURN_NONE;
  }
  return out;
}

// check_tensors(params, grads, buffers, table) -> 0, 1 or 2
//
// `buffers`: a tuple of at most MAX_BUFFERS sequences, one state buffer per tensor in each.
// `table`: a writable int64 buffer of ROW values per tensor: the addresses of the parameter,
// its gradient (0: none) and its state buffers (0 where there is none), the element count, and
// 1 for a tensor the caller copies through staging buffers (then only counts, dtypes and
// layouts are checked, and the gradient column says 1 for a gradient, 0 for none). A gradient
// may be None. 0: every tensor is as the table says; 1: only the gradient column changed, and
// the table now holds the new values; 2: something else changed (rebuild).
constexpr Py_ssize_t ROW = 6;
constexpr Py_ssize_t MAX_BUFFERS = 2;

PyObject* check_tensors(PyObject*, PyObject* args) {
  PyObject *params, *grads, *buffers;
  Py_buffer view;
  if (!PyArg_ParseTuple(args, "OOO!w*", &params, &grads, &PyTuple_Type, &buffers, &view))
    return nullptr;
  PyObject* xs = PySequence_Fast(params, "params must be a sequence");
  PyObject* gs = xs ? PySequence_Fast(grads, "grads must be a sequence") : nullptr;
  const Py_ssize_t n_buffers = PyTuple_GET_SIZE(buffers);
  PyObject* bs[MAX_BUFFERS] = {nullptr, nullptr};
  bool ok_args = gs != nullptr;
  for (Py_ssize_t k = 0; ok_args && k < n_buffers && k < MAX_BUFFERS; k++) {
    bs[k] = PySequence_Fast(PyTuple_GET_ITEM(buffers, k), "buffers must hold sequences");
    ok_args = bs[k] != nullptr;
  }
  auto release = [&]() {
    Py_XDECREF(xs);
    Py_XDECREF(gs);
    for (Py_ssize_t k = 0; k < MAX_BUFFERS; k++) Py_XDECREF(bs[k]);
    PyBuffer_Release(&view);
  };
  if (!ok_args) {
    release();
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(xs);
  int status = 0;
  if (PySequence_Fast_GET_SIZE(gs) != n || n_buffers > MAX_BUFFERS ||
      view.len != static_cast<Py_ssize_t>(n * ROW * sizeof(int64_t)))
    status = 2;
  for (Py_ssize_t k = 0; status != 2 && k < n_buffers; k++)
    if (PySequence_Fast_GET_SIZE(bs[k]) != n) status = 2;
  int64_t* table = static_cast<int64_t*>(view.buf);
  PyTypeObject* ok = nullptr;
  try {
    for (Py_ssize_t i = 0; status != 2 && i < n; i++) {
      int64_t* row = table + i * ROW;
      PyObject* xo = PySequence_Fast_GET_ITEM(xs, i);
      PyObject* go = PySequence_Fast_GET_ITEM(gs, i);
      const bool has_grad = go != Py_None;
      if (!any_tensor(xo, ok) || (has_grad && !any_tensor(go, ok))) {
        status = 2;
        break;
      }
      const at::Tensor& x = THPVariable_Unpack(xo);
      const int64_t numel = row[4];
      const bool staged = row[5] != 0;
      if (x.numel() != numel) {
        status = 2;
        break;
      }
      if (has_grad) {
        const at::Tensor& g = THPVariable_Unpack(go);
        if (g.layout() != c10::kStrided || g.scalar_type() != x.scalar_type() ||
            g.numel() != numel || (!staged && !g.is_contiguous())) {
          status = 2;
          break;
        }
      }
      for (Py_ssize_t k = 0; status != 2 && k < n_buffers; k++) {
        PyObject* bo = PySequence_Fast_GET_ITEM(bs[k], i);
        if (!any_tensor(bo, ok)) {
          status = 2;
          break;
        }
        const at::Tensor& b = THPVariable_Unpack(bo);
        if (b.layout() != c10::kStrided || b.scalar_type() != x.scalar_type() ||
            b.numel() != numel || (!staged && (address(b) != row[2 + k] || !b.is_contiguous())))
          status = 2;
      }
      if (status == 2) break;
      if (staged) {  // copied from whatever the tensors are now; the column says if g exists
        const int64_t present = has_grad ? 1 : 0;
        if (row[1] != present) {
          row[1] = present;
          status = 1;
        }
        continue;
      }
      if (address(x) != row[0] || !x.is_contiguous()) {
        status = 2;
        break;
      }
      const int64_t g_address = has_grad ? address(THPVariable_Unpack(go)) : 0;
      if (g_address != row[1]) {
        row[1] = g_address;
        status = 1;
      }
    }
  } catch (...) {  // e.g. a tensor without storage: not what the table describes
    status = 2;
  }
  release();
  return PyLong_FromLong(status);
}

// specialisation(args, flags) -> tuple of ints
//
// What Triton specialises a compiled kernel variant on, for each launch argument (the key of
// the launcher's direct launches: polyak_fused._kernels.polyak_step._variant_key). `flags[i]`: bit 0 set
// when argument i is do_not_specialize, bit 1 when it is do_not_specialize_on_alignment.
//   tensor: 4 * (scalar type + 1), + 1 if its address is a multiple of 16 and alignment is
//           specialised, + 2 if alignment is not specialised;
//   bool:   1000 + value (0 when do_not_specialize);
//   int:    2000 + 8 * width (0: 32-bit, 1: signed 64-bit, 2: unsigned 64-bit), + 1 if it is 1,
//           + 2 if a multiple of 16, + 4 when do_not_specialize (then no value bits);
//   other:  3000 (by type only: a float, None).
PyObject* specialisation(PyObject*, PyObject* args) {
  PyObject* values;
  Py_buffer flags;
  if (!PyArg_ParseTuple(args, "O!y*", &PyTuple_Type, &values, &flags)) return nullptr;
  const Py_ssize_t n = PyTuple_GET_SIZE(values);
  if (flags.len < n) {
    PyBuffer_Release(&flags);
    PyErr_SetString(PyExc_ValueError, "specialisation: fewer flags than arguments");
    return nullptr;
  }
  const uint8_t* f = static_cast<const uint8_t*>(flags.buf);
  PyObject* out = PyTuple_New(n);
  PyTypeObject* ok = nullptr;
  for (Py_ssize_t i = 0; out && i < n; i++) {
    PyObject* a = PyTuple_GET_ITEM(values, i);
    const bool no_spec = f[i] & 1, no_align = f[i] & 2;
    long long code;
    if (any_tensor(a, ok)) {
      const at::Tensor& t = THPVariable_Unpack(a);
      code = 4LL * (static_cast<int>(t.scalar_type()) + 1);
      if (no_spec || no_align)
        code += 2;
      else if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0)
        code += 1;
    } else if (PyBool_Check(a)) {
      code = 1000 + (no_spec ? 0 : (a == Py_True));
    } else if (PyLong_Check(a)) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(a, &overflow);
      const int width = overflow > 0 ? 2 : (overflow < 0 || v < INT32_MIN || v > INT32_MAX);
      code = 2000 + 8 * width;
      if (no_spec)
        code += 4;
      else if (overflow == 0)
        code += (v == 1) + 2 * (v % 16 == 0);
      PyErr_Clear();
    } else {
      code = 3000;
    }
    PyObject* c = PyLong_FromLongLong(code);
    if (!c) {
      Py_DECREF(out);
      out = nullptr;
      break;
    }
    PyTuple_SET_ITEM(out, i, c);
  }
  PyBuffer_Release(&flags);
  return out;
}

PyMethodDef methods[] = {
    {"grads_of_groups", grads_of_groups, METH_VARARGS, nullptr},
    {"check_tensors", check_tensors, METH_VARARGS, nullptr},
    {"specialisation", specialisation, METH_VARARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_polyak_host_pass", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__polyak_host_pass() { return PyModule_Create(&module); }
