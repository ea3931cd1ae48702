// Every pybind11 line of sia_edge._core. The kernels know nothing of Python; this file turns
// Python buffers into pointers, and refuses anything it would have to copy or could overrun.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "dispatch.h"
#include "graph_stop.h"
#include "kernels/sia_kernels.h"

namespace py = pybind11;

namespace {

// A Python buffer, read without a copy: numpy arrays through their own fields (pybind11's
// numpy API), anything else through the buffer protocol. The per-token call is dominated by
// this bookkeeping at small vocabularies, so the common case avoids numpy's buffer export
// (which formats a type string and allocates on every call).
class Buffer {
   public:
    Buffer(const py::handle& obj, const char* what) {
        if (py::isinstance<py::array>(obj)) {
            auto arr = py::reinterpret_borrow<py::array>(obj);
            const py::dtype dt = arr.dtype();
            buf = const_cast<void*>(arr.data());
            ndim = static_cast<int>(arr.ndim());
            shape = arr.shape();
            strides = arr.strides();
            itemsize = arr.itemsize();
            readonly = !arr.writeable();
            const char order = dt.byteorder();
            kind = (order == '=' || order == '<' || order == '|') ? dt.kind() : '?';
            dtype_ = dt;  // formatted only for an error message: str(dtype) costs tens of microseconds
            return;
        }
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_RECORDS_RO) != 0) {
            PyErr_Clear();
            throw py::type_error(std::string(what) + ": expected a buffer (a numpy array), got " +
                                 std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
        }
        held_ = true;
        buf = view_.buf;
        ndim = view_.ndim;
        shape = view_.shape;
        strides = view_.strides;
        itemsize = view_.itemsize;
        readonly = view_.readonly != 0;
        const std::string format = view_.format ? view_.format : "B";
        static const char* const native[] = {"", "<", "=", "@"};
        for (const char* prefix : native) {
            const std::string p(prefix);
            if (format.size() == p.size() + 1 && format.compare(0, p.size(), p) == 0) {
                const char c = format.back();
                kind = (c == 'f' || c == 'd') ? 'f' : (c == 'i' || c == 'l') ? 'i' : '?';
            }
        }
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() {
        if (held_) PyBuffer_Release(&view_);
    }

    void* buf = nullptr;
    int ndim = 0;
    const Py_ssize_t* shape = nullptr;
    const Py_ssize_t* strides = nullptr;
    Py_ssize_t itemsize = 0;
    bool readonly = true;
    char kind = '?';  // 'f' float, 'i' signed integer (native byte order), '?' anything else

    std::string describe() const {  // the element type, for error messages
        if (dtype_) return "dtype " + std::string(py::str(dtype_));
        return "format '" + std::string(view_.format ? view_.format : "B") + "'";
    }

   private:
    py::object dtype_;
    Py_buffer view_{};
    bool held_ = false;
};

bool is_float32(const Buffer& b) {
    return b.kind == 'f' && b.itemsize == 4;
}
bool is_int32(const Buffer& b) {
    return b.kind == 'i' && b.itemsize == 4;
}
bool is_float64(const Buffer& b) {
    return b.kind == 'f' && b.itemsize == 8;
}

// A 1-D float32 / int32 view: pointer, length and element stride, taken without a copy.
template <typename T>
struct View {
    T* data;
    int64_t n;
    int64_t stride;
};

template <typename T>
View<T> view_1d(const Buffer& b, const char* what, bool writable, bool contiguous) {
    const bool type_ok = std::is_same<T, float>::value ? is_float32(b) : is_int32(b);
    if (!type_ok)
        throw py::type_error(std::string(what) + ": expected a " +
                             (std::is_same<T, float>::value ? "float32" : "int32") + " buffer, got " +
                             b.describe() + " (itemsize " + std::to_string(b.itemsize) +
                             "); convert it explicitly, no copy is made here");
    if (b.ndim != 1)
        throw py::value_error(std::string(what) + ": expected a 1-D buffer, got " + std::to_string(b.ndim) +
                              " dimensions");
    if (writable && b.readonly)
        throw py::value_error(std::string(what) +
                              ": the buffer is read-only, but this call writes to it in place");
    if (b.shape[0] < 1) throw py::value_error(std::string(what) + ": the buffer is empty");
    const int64_t stride_bytes = b.strides[0];
    if (stride_bytes <= 0 || stride_bytes % 4 != 0 || (contiguous && stride_bytes != 4))
        throw py::value_error(std::string(what) + ": unsupported stride of " + std::to_string(stride_bytes) +
                              " bytes; expected " +
                              (contiguous ? "4 (contiguous)" : "a positive multiple of 4"));
    return View<T>{static_cast<T*>(b.buf), b.shape[0], stride_bytes / 4};
}

void check_k(int64_t k, int64_t n) {
    if (k < 1 || k > n || k > sia::kMaxTopK)
        throw py::value_error("k must be in [1, min(vocab, " + std::to_string(sia::kMaxTopK) + ")] = [1, " +
                              std::to_string(n < sia::kMaxTopK ? n : sia::kMaxTopK) + "], got " +
                              std::to_string(k));
    if (n > std::numeric_limits<int32_t>::max())
        throw py::value_error("vocabulary too large: token ids must fit in int32");
}

struct Rng {
    uint64_t state;
};

// The k-entry float64 buffer a sampling call writes its distribution into, or null for None;
// ``holder`` keeps the buffer's view alive for the call.
double* probs_pointer(const py::object& probs_out, int64_t k, std::optional<Buffer>& holder) {
    if (probs_out.is_none()) return nullptr;
    holder.emplace(probs_out, "probs_out");
    const Buffer& pv = *holder;
    if (pv.ndim != 1 || !is_float64(pv) || pv.shape[0] != k || pv.strides[0] != 8 || pv.readonly)
        throw py::type_error("probs_out must be a writable contiguous float64 array of length k");
    return static_cast<double*>(pv.buf);
}

// What the gate sees at one step, returned only for a step that can be sampled: a struct
// sequence (a named tuple made by CPython), which costs a tuple allocation per call where a
// pybind11 class instance would cost a registered-instance insertion too.
PyStructSequence_Field stats_fields[] = {
    {"topk_entropy", "nats over softmax of the top-k logits (SIA's gate statistic)"},
    {"full_lse", "log-sum-exp over the vocabulary"},
    {"full_entropy", "nats over softmax of the whole vocabulary"},
    {nullptr, nullptr}};
PyStructSequence_Desc stats_desc = {"sia_edge._core.JunctionStats",
                                    "What the gate sees at one step (all finite).", stats_fields, 3};
PyTypeObject* stats_type = nullptr;  // created at module import

struct NonFiniteLogits : std::runtime_error {
    using std::runtime_error::runtime_error;
};

py::object checked(const sia::JunctionStats& s) {
    if (s.nan_count || s.posinf_count)
        throw NonFiniteLogits("the model produced " + std::to_string(s.nan_count) + " NaN and " +
                              std::to_string(s.posinf_count) +
                              " +inf logits; the weights or the quantisation are broken for this input "
                              "(try another GGUF quantisation)");
    if (!(s.full_lse > -std::numeric_limits<double>::infinity()))
        throw NonFiniteLogits("every logit is -inf: nothing can be sampled (is every token masked?)");
    py::object out = py::reinterpret_steal<py::object>(PyStructSequence_New(stats_type));
    if (!out) throw py::error_already_set();
    const double values[3] = {s.topk_entropy, s.full_lse, s.full_entropy};
    for (int i = 0; i < 3; ++i) {
        PyObject* value = PyFloat_FromDouble(values[i]);
        if (!value) throw py::error_already_set();
        PyStructSequence_SetItem(out.ptr(), i, value);  // steals the reference
    }
    return out;
}

// Python's view of a GraphStop (csrc/graph_stop.h); the state is not freed with this object.
struct GraphStopHandle {
    sia::GraphStop* state;
    sia::GraphStop* live() const {
        if (state == nullptr) throw std::runtime_error("this GraphStop was released");
        return state;
    }
    void release() {
        sia::release_graph_stop(state);
        state = nullptr;
    }
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "sia-edge native kernels (private: use sia_edge.kernels)";

    py::class_<Rng>(m, "Rng", "SplitMix64 generator; the caller owns it, one per generation.")
        .def(py::init([](uint64_t seed) { return Rng{seed}; }), py::arg("seed"))
        .def_readwrite("state", &Rng::state)
        .def("uniform", [](Rng& r) { return sia::rng_uniform(&r.state); }, "Next double in [0, 1).");

    // One per hidden-only llama.cpp context (sia_edge.llama_backend.LlamaContext): the state lives
    // in C++ until release(), which the context's finaliser calls after llama_free.
    py::class_<GraphStopHandle>(m, "GraphStop",
                                "Ends llama.cpp's graph at the hidden state (csrc/graph_stop.h).")
        .def(py::init([](std::uintptr_t tensor_name) {
                 if (tensor_name == 0)
                     throw std::invalid_argument("GraphStop needs the address of ggml_get_name");
                 return GraphStopHandle{
                     sia::acquire_graph_stop(reinterpret_cast<sia::TensorNameFn>(tensor_name))};
             }),
             py::arg("tensor_name"))
        .def_property_readonly("stops", [](const GraphStopHandle& h) { return h.live()->stops; })
        .def_property_readonly(
            "user_data", [](const GraphStopHandle& h) { return reinterpret_cast<std::uintptr_t>(h.live()); })
        .def("release", &GraphStopHandle::release,
             "Hand the state back for reuse: only once no llama.cpp context holds its address.")
        .def_property_readonly_static("callback", [](const py::object&) {
            return reinterpret_cast<std::uintptr_t>(&sia::sia_graph_stop_callback);
        });

    m.def("available_isas", &sia::available_isas);
    m.def("force_isa", &sia::force_isa, py::arg("name"));
    m.def("active_isa", [] { return std::string(sia::active_kernels().isa); });

    stats_type = PyStructSequence_NewType(&stats_desc);
    if (!stats_type) throw py::error_already_set();
    // The module gets its own reference; stats_type keeps one for the life of the process, so
    // deleting the attribute cannot free a type that checked() still builds instances of.
    Py_INCREF(stats_type);
    m.add_object("JunctionStats", py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(stats_type)));
    py::register_exception<NonFiniteLogits>(m, "NonFiniteLogitsError", PyExc_ValueError);

    // The GIL is released around every kernel: they touch only the buffers held by the Buffer
    // objects alive on this frame and the caller's Rng, never Python objects.
    m.def(
        "junction_stats",
        [](const py::object& logits, int64_t k, const py::object& top_ids, const py::object& top_logits) {
            Buffer lb(logits, "logits"), ib(top_ids, "top_ids"), vb(top_logits, "top_logits");
            auto z = view_1d<float>(lb, "logits", false, false);
            check_k(k, z.n);
            auto ids = view_1d<int32_t>(ib, "top_ids", true, true);
            auto vals = view_1d<float>(vb, "top_logits", true, true);
            if (ids.n < k || vals.n < k)
                throw py::value_error("top_ids and top_logits need room for k entries");
            sia::JunctionStats s{};
            {
                py::gil_scoped_release release;
                sia::active_kernels().junction_stats(z.data, z.n, z.stride, static_cast<int32_t>(k), ids.data,
                                                     vals.data, &s);
            }
            return checked(s);
        },
        py::arg("logits"), py::arg("k"), py::arg("top_ids"), py::arg("top_logits"),
        "Top-k (into top_ids/top_logits) and the step's JunctionStats; NonFiniteLogitsError for NaN, "
        "+inf or all -inf logits.");

    m.def(
        "junction_step",
        [](const py::object& logits, int64_t k, bool gate_on_full_entropy, double threshold,
           float temperature, Rng& rng, const py::object& top_ids, const py::object& top_logits, float top_p,
           float min_p, const py::object& probs_out) {
            Buffer lb(logits, "logits"), ib(top_ids, "top_ids"), vb(top_logits, "top_logits");
            auto z = view_1d<float>(lb, "logits", false, false);
            check_k(k, z.n);
            auto ids = view_1d<int32_t>(ib, "top_ids", true, true);
            auto vals = view_1d<float>(vb, "top_logits", true, true);
            if (ids.n < k || vals.n < k)
                throw py::value_error("top_ids and top_logits need room for k entries");
            std::optional<Buffer> probs_buf;
            double* pptr = probs_pointer(probs_out, k, probs_buf);
            sia::JunctionStats s{};
            int32_t chosen = -1;
            {
                py::gil_scoped_release release;
                sia::active_kernels().junction_stats(z.data, z.n, z.stride, static_cast<int32_t>(k), ids.data,
                                                     vals.data, &s);
                const double stat = gate_on_full_entropy ? s.full_entropy : s.topk_entropy;
                const bool finite = s.nan_count == 0 && s.posinf_count == 0 && s.full_lse > -1e308;
                // Below the gate (NaN never is): sample plainly from the top-k in the same call.
                if (finite && stat < threshold)
                    chosen =
                        sia::steer_topk(nullptr, 1, ids.data, vals.data, nullptr, static_cast<int32_t>(k),
                                        0.0f, temperature, top_p, min_p, false, &rng.state, pptr);
            }
            return std::make_pair(chosen, checked(s));
        },
        py::arg("logits"), py::arg("k"), py::arg("gate_on_full_entropy"), py::arg("threshold"),
        py::arg("temperature"), py::arg("rng"), py::arg("top_ids"), py::arg("top_logits"),
        py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f, py::arg("probs_out") = py::none(),
        "junction_stats, then plain top-k sampling when the gate statistic is below threshold "
        "(its distribution into probs_out, if given). Returns (chosen index or -1 for a junction, "
        "JunctionStats).");

    m.def(
        "steer_topk_inplace",
        [](const py::object& logits, const py::object& top_ids, const py::object& top_logits,
           const py::object& values, float w, float temperature, Rng& rng, const py::object& probs_out,
           float top_p, float min_p) {
            Buffer lb(logits, "logits"), ib(top_ids, "top_ids"), vb(top_logits, "top_logits");
            auto z = view_1d<float>(lb, "logits", true, false);
            auto ids = view_1d<int32_t>(ib, "top_ids", false, true);
            auto top = view_1d<float>(vb, "top_logits", false, true);
            const int64_t k = ids.n;
            if (top.n != k) throw py::value_error("top_ids and top_logits must have the same length");
            check_k(k, z.n);
            for (int64_t i = 0; i < k; ++i)
                if (ids.data[i] < 0 || ids.data[i] >= z.n)
                    throw py::value_error("top_ids[" + std::to_string(i) +
                                          "] = " + std::to_string(ids.data[i]) +
                                          " is outside the logits buffer of length " + std::to_string(z.n));
            const float* vptr = nullptr;
            std::optional<Buffer> values_buf, probs_buf;
            if (!values.is_none()) {
                values_buf.emplace(values, "values");
                auto v = view_1d<float>(*values_buf, "values", false, true);
                if (v.n != k) throw py::value_error("values must have one entry per candidate (k)");
                vptr = v.data;
            }
            double* pptr = probs_pointer(probs_out, k, probs_buf);
            int32_t chosen;
            {
                py::gil_scoped_release release;
                chosen = sia::steer_topk(z.data, z.stride, ids.data, top.data, vptr, static_cast<int32_t>(k),
                                         w, temperature, top_p, min_p, true, &rng.state, pptr);
            }
            return chosen;
        },
        py::arg("logits"), py::arg("top_ids"), py::arg("top_logits"), py::arg("values"), py::arg("w"),
        py::arg("temperature"), py::arg("rng"), py::arg("probs_out") = py::none(), py::arg("top_p") = 1.0f,
        py::arg("min_p") = 0.0f,
        "Write z + w*V into logits at top_ids, sample one candidate; returns its index.");

    m.def(
        "value_head",
        [](const py::object& hidden, const py::object& weight, float bias, const py::object& out) {
            Buffer hb(hidden, "hidden"), wb(weight, "weight"), ob(out, "out");
            const Buffer& h = hb;
            if (!is_float32(h) || h.ndim != 2)
                throw py::type_error("hidden: expected a 2-D float32 buffer (rows x width)");
            if (h.strides[1] != 4 || h.strides[0] % 4 != 0 || h.strides[0] < h.shape[1] * 4)
                throw py::value_error("hidden: rows must be contiguous float32 with a row stride >= width");
            auto w = view_1d<float>(wb, "weight", false, true);
            auto o = view_1d<float>(ob, "out", true, true);
            if (w.n != h.shape[1])
                throw py::value_error("weight has " + std::to_string(w.n) +
                                      " entries but hidden rows have width " + std::to_string(h.shape[1]));
            if (o.n != h.shape[0]) throw py::value_error("out must have one entry per hidden row");
            {
                py::gil_scoped_release release;
                sia::active_kernels().value_head(static_cast<const float*>(h.buf), h.shape[0], h.shape[1],
                                                 h.strides[0] / 4, w.data, bias, o.data);
            }
        },
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("out"));

    m.def(
        "candidate_head",
        [](const py::object& hidden, const py::object& weight, float bias, const py::object& proj,
           const py::object& proj_bias, const py::object& table, const py::object& token_bias,
           const py::object& candidates, const py::object& out) {
            Buffer hb(hidden, "hidden"), wb(weight, "weight"), pb(proj, "proj"), pbb(proj_bias, "proj_bias"),
                tb(table, "table"), tbb(token_bias, "token_bias"), cb(candidates, "candidates"),
                ob(out, "out");
            auto h = view_1d<float>(hb, "hidden", false, true);
            auto w = view_1d<float>(wb, "weight", false, true);
            auto a = view_1d<float>(pbb, "proj_bias", false, true);
            auto b = view_1d<float>(tbb, "token_bias", false, true);
            auto c = view_1d<int32_t>(cb, "candidates", false, true);
            auto o = view_1d<float>(ob, "out", true, true);
            auto matrix = [](const Buffer& m, const char* what, int64_t rows, int64_t cols) {
                if (!is_float32(m) || m.ndim != 2 || m.strides[1] != 4 || m.strides[0] != cols * 4 ||
                    m.shape[0] != rows || m.shape[1] != cols)
                    throw py::value_error(std::string(what) + ": expected a contiguous float32 matrix of " +
                                          std::to_string(rows) + " x " + std::to_string(cols));
                return static_cast<const float*>(m.buf);
            };
            const int64_t d = h.n, r = a.n, n_vocab = b.n;
            if (w.n != d)
                throw py::value_error("weight has " + std::to_string(w.n) + " entries but hidden has " +
                                      std::to_string(d));
            if (r > sia::kMaxCandidateRank)
                throw py::value_error("candidate head rank " + std::to_string(r) + " exceeds " +
                                      std::to_string(sia::kMaxCandidateRank));
            const float* pm = matrix(pb, "proj", r, d);
            const float* tm = matrix(tb, "table", n_vocab, r);
            if (o.n != c.n) throw py::value_error("out must have one entry per candidate");
            for (int64_t i = 0; i < d; ++i)
                if (!std::isfinite(h.data[i]))
                    throw py::value_error(
                        "hidden state contains NaN or infinity: the value model's output is broken");
            for (int64_t j = 0; j < c.n; ++j)
                if (c.data[j] < 0 || c.data[j] >= n_vocab)
                    throw py::value_error("candidate id " + std::to_string(c.data[j]) + " is outside the " +
                                          std::to_string(n_vocab) +
                                          "-token vocabulary of the candidate head");
            {
                py::gil_scoped_release release;
                sia::candidate_head(sia::active_kernels().value_head, h.data, d, w.data, bias, pm, a.data, r,
                                    tm, b.data, c.data, static_cast<int32_t>(c.n), o.data);
            }
        },
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("proj"), py::arg("proj_bias"),
        py::arg("table"), py::arg("token_bias"), py::arg("candidates"), py::arg("out"),
        "Candidate-head values Q(s, c_j) for k candidate ids from the prefix's hidden state.");
}
