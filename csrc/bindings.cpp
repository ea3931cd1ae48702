// Every pybind11 line of sia_edge._core. The kernels know nothing of Python; this file turns
// Python buffers into pointers, and refuses anything it would have to copy or could overrun.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>

#include "dispatch.h"
#include "kernels/sia_kernels.h"

namespace py = pybind11;

namespace {

// A 1-D float32 / int32 view: pointer, length and element stride, taken without a copy.
template <typename T>
struct View {
    T* data;
    int64_t n;
    int64_t stride;
};

bool is_float32(const py::buffer_info& info) {
    return info.itemsize == 4 && (info.format == "f" || info.format == "<f" || info.format == "=f");
}
bool is_int32(const py::buffer_info& info) {
    return info.itemsize == 4 && (info.format == "i" || info.format == "<i" || info.format == "=i" ||
                                  info.format == "l" || info.format == "<l" || info.format == "=l");
}

template <typename T>
View<T> view_1d(const py::buffer& obj, const char* what, bool writable, bool contiguous,
                py::buffer_info& keep) {
    keep = obj.request(false);
    const bool type_ok = std::is_same<T, float>::value ? is_float32(keep) : is_int32(keep);
    if (!type_ok)
        throw py::type_error(std::string(what) + ": expected a " +
                             (std::is_same<T, float>::value ? "float32" : "int32") + " buffer, got format '" +
                             keep.format + "' (itemsize " + std::to_string(keep.itemsize) +
                             "); convert it explicitly, no copy is made here");
    if (keep.ndim != 1)
        throw py::value_error(std::string(what) + ": expected a 1-D buffer, got " +
                              std::to_string(keep.ndim) + " dimensions");
    if (writable && keep.readonly)
        throw py::value_error(std::string(what) +
                              ": the buffer is read-only, but this call writes to it in place");
    const int64_t stride_bytes = keep.strides[0];
    if (stride_bytes <= 0 || stride_bytes % 4 != 0 || (contiguous && stride_bytes != 4))
        throw py::value_error(std::string(what) + ": unsupported stride of " + std::to_string(stride_bytes) +
                              " bytes; expected " +
                              (contiguous ? "4 (contiguous)" : "a positive multiple of 4"));
    if (keep.shape[0] < 1) throw py::value_error(std::string(what) + ": the buffer is empty");
    return View<T>{static_cast<T*>(keep.ptr), keep.shape[0], stride_bytes / 4};
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

py::tuple stats_tuple(const sia::JunctionStats& s) {
    return py::make_tuple(s.topk_entropy, s.full_lse, s.full_entropy, s.nan_count, s.posinf_count);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "sia-edge native kernels (private: use sia_edge.kernels)";

    py::class_<Rng>(m, "Rng", "SplitMix64 generator; the caller owns it, one per generation.")
        .def(py::init([](uint64_t seed) { return Rng{seed}; }), py::arg("seed"))
        .def_readwrite("state", &Rng::state)
        .def("uniform", [](Rng& r) { return sia::rng_uniform(&r.state); }, "Next double in [0, 1).");

    m.def("available_isas", &sia::available_isas);
    m.def("force_isa", &sia::force_isa, py::arg("name"));
    m.def("active_isa", [] { return std::string(sia::active_kernels().isa); });

    // The GIL is released around every kernel: they touch only the buffers held by the
    // buffer_info objects alive on this frame and the caller's Rng, never Python objects.
    m.def(
        "junction_stats",
        [](const py::buffer& logits, int64_t k, const py::buffer& top_ids, const py::buffer& top_logits) {
            py::buffer_info li, ii, vi;
            auto z = view_1d<float>(logits, "logits", false, false, li);
            check_k(k, z.n);
            auto ids = view_1d<int32_t>(top_ids, "top_ids", true, true, ii);
            auto vals = view_1d<float>(top_logits, "top_logits", true, true, vi);
            if (ids.n < k || vals.n < k)
                throw py::value_error("top_ids and top_logits need room for k entries");
            sia::JunctionStats s{};
            {
                py::gil_scoped_release release;
                sia::active_kernels().junction_stats(z.data, z.n, z.stride, static_cast<int32_t>(k), ids.data,
                                                     vals.data, &s);
            }
            return stats_tuple(s);
        },
        py::arg("logits"), py::arg("k"), py::arg("top_ids"), py::arg("top_logits"),
        "Top-k (into top_ids/top_logits) and (topk_entropy, full_lse, full_entropy, nan_count, "
        "posinf_count).");

    m.def(
        "junction_step",
        [](const py::buffer& logits, int64_t k, bool gate_on_full_entropy, double threshold,
           float temperature, Rng& rng, const py::buffer& top_ids, const py::buffer& top_logits) {
            py::buffer_info li, ii, vi;
            auto z = view_1d<float>(logits, "logits", false, false, li);
            check_k(k, z.n);
            auto ids = view_1d<int32_t>(top_ids, "top_ids", true, true, ii);
            auto vals = view_1d<float>(top_logits, "top_logits", true, true, vi);
            if (ids.n < k || vals.n < k)
                throw py::value_error("top_ids and top_logits need room for k entries");
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
                                        0.0f, temperature, false, &rng.state, nullptr);
            }
            return py::make_tuple(chosen, s.topk_entropy, s.full_lse, s.full_entropy, s.nan_count,
                                  s.posinf_count);
        },
        py::arg("logits"), py::arg("k"), py::arg("gate_on_full_entropy"), py::arg("threshold"),
        py::arg("temperature"), py::arg("rng"), py::arg("top_ids"), py::arg("top_logits"),
        "junction_stats, then plain top-k sampling when the gate statistic is below threshold. "
        "Returns (chosen index or -1 for a junction, topk_entropy, full_lse, full_entropy, nan, posinf).");

    m.def(
        "steer_topk_inplace",
        [](const py::buffer& logits, const py::buffer& top_ids, const py::buffer& top_logits,
           const py::object& values, float w, float temperature, Rng& rng, const py::object& probs_out) {
            py::buffer_info li, ii, vi, wi, pi;
            auto z = view_1d<float>(logits, "logits", true, false, li);
            auto ids = view_1d<int32_t>(top_ids, "top_ids", false, true, ii);
            auto top = view_1d<float>(top_logits, "top_logits", false, true, vi);
            const int64_t k = ids.n;
            if (top.n != k) throw py::value_error("top_ids and top_logits must have the same length");
            check_k(k, z.n);
            for (int64_t i = 0; i < k; ++i)
                if (ids.data[i] < 0 || ids.data[i] >= z.n)
                    throw py::value_error("top_ids[" + std::to_string(i) +
                                          "] = " + std::to_string(ids.data[i]) +
                                          " is outside the logits buffer of length " + std::to_string(z.n));
            const float* vptr = nullptr;
            if (!values.is_none()) {
                auto v = view_1d<float>(values.cast<py::buffer>(), "values", false, true, wi);
                if (v.n != k) throw py::value_error("values must have one entry per candidate (k)");
                vptr = v.data;
            }
            double* pptr = nullptr;
            if (!probs_out.is_none()) {
                pi = probs_out.cast<py::buffer>().request(true);
                if (pi.ndim != 1 || pi.itemsize != 8 || pi.format != "d" || pi.shape[0] != k ||
                    pi.strides[0] != 8)
                    throw py::type_error("probs_out must be a contiguous float64 array of length k");
                pptr = static_cast<double*>(pi.ptr);
            }
            int32_t chosen;
            {
                py::gil_scoped_release release;
                chosen = sia::steer_topk(z.data, z.stride, ids.data, top.data, vptr, static_cast<int32_t>(k),
                                         w, temperature, true, &rng.state, pptr);
            }
            return chosen;
        },
        py::arg("logits"), py::arg("top_ids"), py::arg("top_logits"), py::arg("values"), py::arg("w"),
        py::arg("temperature"), py::arg("rng"), py::arg("probs_out") = py::none(),
        "Write z + w*V into logits at top_ids, sample one candidate; returns its index.");

    m.def(
        "value_head",
        [](const py::buffer& hidden, const py::buffer& weight, float bias, const py::buffer& out) {
            py::buffer_info hi = hidden.request(false), wi, oi;
            if (!is_float32(hi) || hi.ndim != 2)
                throw py::type_error("hidden: expected a 2-D float32 buffer (rows x width)");
            if (hi.strides[1] != 4 || hi.strides[0] % 4 != 0 || hi.strides[0] < hi.shape[1] * 4)
                throw py::value_error("hidden: rows must be contiguous float32 with a row stride >= width");
            auto w = view_1d<float>(weight, "weight", false, true, wi);
            auto o = view_1d<float>(out, "out", true, true, oi);
            if (w.n != hi.shape[1])
                throw py::value_error("weight has " + std::to_string(w.n) +
                                      " entries but hidden rows have width " + std::to_string(hi.shape[1]));
            if (o.n != hi.shape[0]) throw py::value_error("out must have one entry per hidden row");
            {
                py::gil_scoped_release release;
                sia::active_kernels().value_head(static_cast<const float*>(hi.ptr), hi.shape[0], hi.shape[1],
                                                 hi.strides[0] / 4, w.data, bias, o.data);
            }
        },
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("out"));
}
