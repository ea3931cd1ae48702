#include "graph_stop.h"

#include <cstring>
#include <mutex>
#include <vector>

namespace sia {

namespace {

// The node llama.cpp hands out as the hidden state (llm_graph_result::t_embd): "result_norm",
// renamed "result_embd_pooled" in embeddings mode when the model does not pool. A model that
// pools keeps "result_norm" before its pooling nodes; stopping there leaves the pooled output
// unwritten, which the check at load sees (the shortcut is then off for that model).
bool is_hidden_state(const char* name) {
    return name != nullptr &&
           (std::strcmp(name, "result_norm") == 0 || std::strcmp(name, "result_embd_pooled") == 0);
}

std::mutex free_mutex;
// Never destroyed: a context still decoding while the process exits may read its GraphStop.
std::vector<GraphStop*>* free_list = new std::vector<GraphStop*>();

}  // namespace

GraphStop* acquire_graph_stop(TensorNameFn tensor_name) {
    GraphStop* stop = nullptr;
    {
        std::lock_guard<std::mutex> lock(free_mutex);
        if (!free_list->empty()) {
            stop = free_list->back();
            free_list->pop_back();
        }
    }
    if (stop == nullptr) stop = new GraphStop();
    *stop = GraphStop{};
    stop->tensor_name = tensor_name;
    return stop;
}

void release_graph_stop(GraphStop* stop) {
    if (stop == nullptr) return;
    std::lock_guard<std::mutex> lock(free_mutex);
    free_list->push_back(stop);
}

extern "C" bool sia_graph_stop_callback(void* tensor, bool ask, void* user_data) {
    auto* stop = static_cast<GraphStop*>(user_data);
    if (stop == nullptr || stop->tensor_name == nullptr) {
        return !ask;  // asked: not wanted (the graph runs in one piece); told: go on
    }
    if (ask) {
        return is_hidden_state(stop->tensor_name(tensor));
    }
    ++stop->stops;
    return false;  // computed: the scheduler ends the graph here
}

}  // namespace sia
