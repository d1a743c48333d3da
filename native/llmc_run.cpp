// llmc-run: greedy generation from an llmc OpenVINO artifact, without Python.
//
//   llmc-run ARTIFACT_DIR [--max-new-tokens N] [--threads N] [--eos ID]... [--bf16] ID [ID ...]
//
// Reads ARTIFACT_DIR/openvino_model.xml (a stateful IR built by `llmc build --target openvino`),
// prefills the prompt token ids, then decodes greedily, printing each new token id on stdout as
// it is produced (space-separated, newline at the end). Timing goes to stderr. The inputs are the
// artifact contract (see targets/openvino/session.py): input_ids, position_ids and attention_mask
// [1, S] int64, logits_index [1] int64 (which position's logits to compute), beam_idx [1] int32;
// the KV cache is the model's state.
#include <openvino/openvino.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <set>
#include <string>
#include <vector>

namespace {

int usage(const char* why) {
    std::cerr << "llmc-run: " << why << "\n"
              << "usage: llmc-run ARTIFACT_DIR [--max-new-tokens N] [--threads N] [--eos ID]... "
                 "[--bf16] ID [ID ...]\n";
    return 2;
}

bool parse_int(const std::string& text, long long& value) {
    char* end = nullptr;
    value = std::strtoll(text.c_str(), &end, 10);
    return !text.empty() && end && *end == '\0';
}

ov::Tensor int64_tensor(const std::vector<int64_t>& values) {
    ov::Tensor t(ov::element::i64, {1, values.size()});
    std::copy(values.begin(), values.end(), t.data<int64_t>());
    return t;
}

// One step: feed `ids` after `past` cached tokens, return the last position's argmax.
int64_t step(ov::InferRequest& request, const std::vector<int64_t>& ids, size_t past) {
    std::vector<int64_t> positions(ids.size()), mask(past + ids.size(), 1);
    for (size_t i = 0; i < ids.size(); ++i) positions[i] = static_cast<int64_t>(past + i);
    request.set_tensor("input_ids", int64_tensor(ids));
    request.set_tensor("position_ids", int64_tensor(positions));
    request.set_tensor("attention_mask", int64_tensor(mask));
    ov::Tensor index(ov::element::i64, {1});
    index.data<int64_t>()[0] = static_cast<int64_t>(ids.size() - 1);
    request.set_tensor("logits_index", index);
    ov::Tensor beam(ov::element::i32, {1});
    beam.data<int32_t>()[0] = 0;
    request.set_tensor("beam_idx", beam);
    request.infer();
    const ov::Tensor logits = request.get_tensor("logits");  // [1, 1, V]
    const float* row = logits.data<const float>();
    const size_t vocab = logits.get_shape().back();
    return static_cast<int64_t>(std::max_element(row, row + vocab) - row);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) return usage("needs an artifact directory and at least one token id");
    const std::string dir = argv[1];
    long long max_new = 32, threads = 0;
    bool bf16 = false;
    std::set<int64_t> eos;
    std::vector<int64_t> prompt;
    for (int i = 2; i < argc; ++i) {
        const std::string arg = argv[i];
        long long v = 0;
        if (arg == "--max-new-tokens" || arg == "--threads" || arg == "--eos") {
            if (i + 1 >= argc || !parse_int(argv[i + 1], v) || v < 0)
                return usage((arg + " takes a non-negative integer").c_str());
            ++i;
            if (arg == "--max-new-tokens") max_new = v;
            else if (arg == "--threads") threads = v;
            else eos.insert(v);
        } else if (arg == "--bf16") {
            bf16 = true;
        } else if (parse_int(arg, v) && v >= 0) {
            prompt.push_back(v);
        } else {
            return usage(("not a token id or option: " + arg).c_str());
        }
    }
    if (prompt.empty()) return usage("needs at least one prompt token id");

    try {
        ov::Core core;
        // Exact unless --bf16: every numeric property of the CPU plugin pinned, the table EXACT
        // of targets/openvino/session.py (the plugin otherwise picks bf16 compute, a u8 KV cache
        // and int8 activations by CPU generation).
        ov::AnyMap config{{"PERFORMANCE_HINT", "LATENCY"}, {"NUM_STREAMS", "1"}};
        if (bf16) {
            config["INFERENCE_PRECISION_HINT"] = "bf16";
        } else {
            for (const char* key : {"INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION",
                                    "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION"})
                config[key] = "f32";
            for (const char* key : {"KEY_CACHE_GROUP_SIZE", "VALUE_CACHE_GROUP_SIZE",
                                    "DYNAMIC_QUANTIZATION_GROUP_SIZE"})
                config[key] = "0";
            config["EXECUTION_MODE_HINT"] = "ACCURACY";
            config["CPU_DENORMALS_OPTIMIZATION"] = "NO";
            config["CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"] = "1";
        }
        if (threads > 0) config["INFERENCE_NUM_THREADS"] = std::to_string(threads);
        ov::CompiledModel compiled = core.compile_model(dir + "/openvino_model.xml", "CPU", config);
        ov::InferRequest request = compiled.create_infer_request();
        request.reset_state();

        using clock = std::chrono::steady_clock;
        const auto start = clock::now();
        int64_t token = step(request, prompt, 0);
        const auto first = clock::now();
        size_t length = prompt.size();
        long long produced = 0;
        while (produced < max_new) {
            std::cout << (produced ? " " : "") << token << std::flush;
            ++produced;
            if (eos.count(token) || produced == max_new) break;
            token = step(request, {token}, length);
            ++length;
        }
        std::cout << "\n";
        const auto end = clock::now();
        const double ttft = std::chrono::duration<double>(first - start).count();
        const double decode = std::chrono::duration<double>(end - first).count();
        std::cerr << "ttft_s " << ttft << " decode_tokens_per_s "
                  << (produced > 1 ? (produced - 1) / decode : 0.0) << "\n";
    } catch (const std::exception& e) {
        std::cerr << "llmc-run: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
