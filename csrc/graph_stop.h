// Ends llama.cpp's compute graph at the final-norm hidden state, before the vocabulary head.
//
// llama.cpp's scheduler asks an eval callback (ggml_backend_sched_eval_callback, set in
// llama_context_params.cb_eval) about every node of a graph: first whether the caller wants to
// see it, then, once it is computed, whether to go on. Answering "stop" after the node llama.cpp
// returns as the hidden state skips what follows it: the vocabulary head (an n_vocab x n_embd
// matrix product per output row), which a value model never reads. The hidden states are the
// same bits either way; sia_edge/llama_backend.py checks that once per model before relying on it.
#pragma once

#include <cstdint>

namespace sia {

// ggml_get_name, resolved by the caller from the ggml library llama.cpp loaded: this extension
// does not link against ggml.
using TensorNameFn = const char* (*)(const void* tensor);

struct GraphStop {
    TensorNameFn tensor_name = nullptr;
    uint64_t stops = 0;  // decodes ended at the hidden state (what tests read)
};

// A GraphStop that stays valid until release_graph_stop, whatever happens to the Python object
// that holds it: llama.cpp keeps its address for the life of a context, and a context may still be
// decoding on a daemon thread while the interpreter exits and frees Python objects. Released ones
// are reused, so a process that creates many contexts does not grow.
GraphStop* acquire_graph_stop(TensorNameFn tensor_name);
void release_graph_stop(GraphStop* stop);

// The callback itself; user_data is a GraphStop. Plain C linkage: llama.cpp calls it through a
// function pointer on the thread that called llama_decode (the GIL released), so it touches no
// Python object.
extern "C" bool sia_graph_stop_callback(void* tensor, bool ask, void* user_data);

}  // namespace sia
