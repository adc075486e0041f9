// bibo_runner: greedy generation from a BiBo ExecuTorch program (.pte), in C++ on ExecuTorch's
// released runtime and BiBo's kernel library, as an app on a device would run it.
//
//   bibo_runner MODEL.pte --prompt-ids 3,1,2 [--prompt-ids ...] [--max-new-tokens 16]
//               [--threads N] [--logits FILE] [--json] [--verbose]
//
// The program's contract (docs/export.md): forward(tokens [1, T] int64, input_pos [1] int64)
// → logits [1, T, V] float32, with the KV cache inside the program; a call at position 0
// starts a sequence (the prefill), then one call per generated token (decode steps).
//
// Each --prompt-ids is a sequence of its own, generated in turn. Prints the generated ids, the
// median prefill time, and decode tokens/s from the median of the decode steps each timed
// alone (the measure bibo-export's Python timings use). --logits writes every logits row the
// calls computed (per prompt: the prefill's T, then one per decode step) as raw float32, for
// comparisons; --json prints the results as one JSON line instead.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

// The wheel ships ExecuTorch's thread pool library but not its header: the two functions
// that size the pool, declared as the library defines them.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

// Which int8 dot-product path BiBo's kernel library took on this CPU (moe_experts.cpp).
extern "C" const char* bibo_kernels_int8_path();

namespace {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

struct Options {
  std::string model;
  std::vector<std::vector<int64_t>> prompts;
  int64_t max_new_tokens = 16;
  int threads = 0;  // 0: ExecuTorch's default (the CPU's cores)
  std::string logits_path;
  bool json = false, verbose = false;
};

const char* const USAGE =
    "usage: bibo_runner MODEL.pte --prompt-ids 3,1,2 [--prompt-ids ...] [--max-new-tokens N] "
    "[--threads N] [--logits FILE] [--json] [--verbose]";

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  std::exit(1);
}

// ExecuTorch's log lines are not printed (with --verbose they are): a failure is then one line
// of ours, and a missing operator's name is read from the line that reports it.
bool verbose_log = false;
std::set<std::string> missing_operators;

void log_message(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t,
                 const char* message, size_t length) {
  std::string text(message, length);
  text.erase(text.find_last_not_of(" \n") + 1);
  const std::string marker = "Missing operator: [";
  const size_t name = text.find("] ");
  if (text.rfind(marker, 0) == 0 && name != std::string::npos) {
    missing_operators.insert(text.substr(name + 2));
  }
  if (verbose_log) std::fprintf(stderr, "[executorch %c] %s\n", static_cast<char>(level),
                                text.c_str());
}

std::string hex(Error error) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%x", static_cast<unsigned>(error));
  return text;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    char* end = nullptr;
    const long long id = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || id < 0) {
      fail("--prompt-ids must be comma-separated non-negative integers, got '" + text + "'");
    }
    ids.push_back(id);
  }
  if (ids.empty()) fail("--prompt-ids is empty");
  return ids;
}

int64_t parse_count(const char* flag, const char* text, int64_t minimum) {
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (*text == '\0' || *end != '\0' || value < minimum) {
    fail(std::string(flag) + " must be an integer >= " + std::to_string(minimum) + ", got '" +
         text + "'");
  }
  return value;
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--prompt-ids" && has_value) {
      options.prompts.push_back(parse_ids(argv[++i]));
    } else if (arg == "--max-new-tokens" && has_value) {
      options.max_new_tokens = parse_count("--max-new-tokens", argv[++i], 1);
    } else if (arg == "--threads" && has_value) {
      options.threads = static_cast<int>(parse_count("--threads", argv[++i], 1));
    } else if (arg == "--logits" && has_value) {
      options.logits_path = argv[++i];
    } else if (arg == "--json") {
      options.json = true;
    } else if (arg == "--verbose") {
      options.verbose = true;
    } else if (arg.rfind("--", 0) != 0 && options.model.empty()) {
      options.model = arg;
    } else {
      fail("unexpected argument '" + arg + "' (" + USAGE + ")");
    }
  }
  if (options.model.empty() || options.prompts.empty()) {
    fail(USAGE);
  }
  return options;
}

// Where an operator the program calls comes from, for the error that names what to link.
std::string library_of(const std::string& op) {
  if (op.rfind("bibo::", 0) == 0) return "BiBo's kernel library libbibo_kernels.so has them";
  if (op.rfind("llama::", 0) == 0) {
    return "ExecuTorch ships them only in libcustom_ops_aot_lib.so, which needs libtorch; the "
           "program was exported by an earlier bibo-export: re-export it";
  }
  if (op.rfind("quantized_decomposed::", 0) == 0) {
    return "ExecuTorch's libexecutorch_kernels_quantized.so has them";
  }
  return "link the kernel library that registers them";
}

void load_forward(Module& module, const std::string& path) {
  const Error error = module.load_method("forward");
  if (error == Error::Ok) return;
  if (!missing_operators.empty()) {
    std::string names, where;
    for (const auto& op : missing_operators) {
      names += (names.empty() ? "" : ", ") + op;
      if (where.empty()) where = library_of(op);
    }
    fail(path + " calls operators this runner lacks, " + names + ": " + where);
  }
  fail("ExecuTorch could not load " + path + "'s forward method (error " + hex(error) +
       "): is it a BiBo ExecuTorch program? --verbose shows ExecuTorch's log");
}

// A constant the export writes as a method (get_max_seq_len, get_vocab_size), or `missing`.
int64_t program_constant(Module& module, const char* name, int64_t missing) {
  const auto names = module.method_names();
  if (!names.ok() || !names->count(name)) return missing;
  const auto result = module.execute(name);
  return result.ok() ? result->at(0).toInt() : missing;
}

struct Call {
  std::vector<float> logits;  // [T, V]
  int64_t vocab;
  double seconds;
};

Call forward(Module& module, std::vector<int64_t>& tokens, int64_t position) {
  int64_t input_pos = position;
  auto ids = executorch::extension::from_blob(
      tokens.data(), {1, static_cast<executorch::aten::SizesType>(tokens.size())},
      ScalarType::Long);
  auto pos = executorch::extension::from_blob(&input_pos, {1}, ScalarType::Long);
  const auto start = std::chrono::steady_clock::now();
  const auto result = module.execute("forward", {EValue(ids), EValue(pos)});
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!result.ok()) {
    fail("forward at position " + std::to_string(position) + " failed (error " +
         hex(result.error()) + "); --verbose shows ExecuTorch's log");
  }
  const auto& out = result->at(0).toTensor();
  if (out.scalar_type() != ScalarType::Float || out.dim() != 3) {
    fail("forward returned no float32 logits [1, T, V]: not a BiBo program");
  }
  const float* data = out.const_data_ptr<float>();
  return {std::vector<float>(data, data + out.numel()), out.size(2), seconds};
}

int64_t argmax_last_row(const Call& call) {
  const float* row = call.logits.data() + call.logits.size() - call.vocab;
  return std::max_element(row, row + call.vocab) - row;
}

struct Generation {
  std::vector<int64_t> tokens;
  double prefill_s;
  std::vector<double> steps_s;
  int64_t vocab;
};

// One sequence: the prefill at position 0 (which starts it afresh), then a call per new token.
Generation generate(Module& module, const std::vector<int64_t>& prompt, int64_t new_tokens,
                    int64_t limit, std::ofstream& logits) {
  const int64_t length = static_cast<int64_t>(prompt.size()) + new_tokens - 1;
  if (length > limit) {
    fail("prompt and new tokens need " + std::to_string(length) + " positions; the program " +
         "holds " + std::to_string(limit));
  }
  auto keep = [&](const Call& call) {
    if (logits) logits.write(reinterpret_cast<const char*>(call.logits.data()),
                             call.logits.size() * sizeof(float));
  };
  std::vector<int64_t> tokens = prompt;
  Call call = forward(module, tokens, 0);
  keep(call);
  Generation generation{{argmax_last_row(call)}, call.seconds, {}, call.vocab};
  for (int64_t step = 1; step < new_tokens; ++step) {
    std::vector<int64_t> token{generation.tokens.back()};
    call = forward(module, token, static_cast<int64_t>(prompt.size()) + step - 1);
    keep(call);
    generation.steps_s.push_back(call.seconds);
    generation.tokens.push_back(argmax_last_row(call));
  }
  return generation;
}

double median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : 0.5 * (values[mid - 1] + values[mid]);
}

std::string joined(const std::vector<int64_t>& ids, const char* separator) {
  std::string text;
  for (size_t i = 0; i < ids.size(); ++i) text += (i ? separator : "") + std::to_string(ids[i]);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  verbose_log = options.verbose;
  executorch::runtime::register_pal(
      executorch::runtime::PalImpl::create(log_message, __FILE__));
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (options.threads > 0) pool->_unsafe_reset_threadpool(options.threads);

  std::ifstream probe(options.model, std::ios::binary);
  if (!probe) fail(options.model + " not found or not readable");
  Module module(options.model, Module::LoadMode::MmapUseMlockIgnoreErrors);
  load_forward(module, options.model);
  const int64_t limit = program_constant(module, "get_max_seq_len", INT64_MAX);
  const int64_t vocab_size = program_constant(module, "get_vocab_size", INT64_MAX);
  for (const auto& prompt : options.prompts) {
    for (const int64_t id : prompt) {
      if (id >= vocab_size) {
        fail("token id " + std::to_string(id) + " is outside the vocabulary (" +
             std::to_string(vocab_size) + " tokens)");
      }
    }
  }

  std::ofstream logits;
  if (!options.logits_path.empty()) {
    logits.open(options.logits_path, std::ios::binary);
    if (!logits) fail("cannot write " + options.logits_path);
  }
  std::vector<std::vector<int64_t>> outputs;
  std::vector<double> prefills, steps;
  int64_t vocab = 0;
  for (const auto& prompt : options.prompts) {
    const Generation generation = generate(module, prompt, options.max_new_tokens, limit,
                                           logits);
    outputs.push_back(generation.tokens);
    prefills.push_back(generation.prefill_s);
    steps.insert(steps.end(), generation.steps_s.begin(), generation.steps_s.end());
    vocab = generation.vocab;
  }
  const double prefill_ms = median(prefills) * 1e3, step_s = median(steps);
  const double decode_tok_s = step_s > 0 ? 1.0 / step_s : 0.0;
  const size_t threads = pool->get_thread_count();
  if (options.json) {
    std::string lists;
    for (const auto& tokens : outputs) lists += (lists.empty() ? "[" : ", [") +
                                                joined(tokens, ", ") + "]";
    std::printf("{\"tokens\": [%s], \"prefill_ms\": %.4f, \"decode_tok_s\": %.3f, "
                "\"vocab\": %lld, \"threads\": %zu, \"int8_path\": \"%s\"}\n",
                lists.c_str(), prefill_ms, decode_tok_s, static_cast<long long>(vocab),
                threads, bibo_kernels_int8_path());
    return 0;
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    std::printf("prompt %s -> %s\n", joined(options.prompts[i], ",").c_str(),
                joined(outputs[i], ",").c_str());
  }
  std::printf("prefill: %.3f ms (median of %zu); decode: %.1f tokens/s (median of %zu steps); "
              "%zu threads; int8 kernels: %s\n", prefill_ms, prefills.size(), decode_tok_s,
              steps.size(), threads, bibo_kernels_int8_path());
  return 0;
}
