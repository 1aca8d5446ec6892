// `vqkv`: the command-line tool. Codec commands (ratio, capture, fit, eval, fidelity) work
// offline; service commands talk to a running vqkvd.
#include <cstdio>
#include <cstring>
#include <string>

#include "client/cpp/cli/commands.h"
#include "client/cpp/cli/service_commands.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* help;
};

const Command kCommands[] = {
    {"ratio", vqkv::cli::RunRatio,
     "compression ratio of an rvq/scalar setting (codes-only and all-in)"},
    {"capture", vqkv::cli::RunCapture, "run a model over text and save its K/V/Q samples"},
    {"fit", vqkv::cli::RunFit, "fit rvq codebooks from K/V samples (or choose a split for --bits)"},
    {"eval", vqkv::cli::RunEval, "fidelity of a codec on K/V samples"},
    {"fidelity", vqkv::cli::RunFidelity,
     "fit on one half of a text, evaluate codecs on the other half"},
    {"demo", vqkv::cli::RunDemo, "service demo against a running vqkvd (real model KV round trip)"},
    {"put", vqkv::cli::RunPut, "store KV blocks in a running vqkvd"},
    {"get", vqkv::cli::RunGet, "read KV blocks back from vqkvd (tensors or codes)"},
    {"lookup", vqkv::cli::RunLookup, "how many leading blocks of a prompt vqkvd has"},
    {"stats", vqkv::cli::RunStats, "vqkvd store, tier and model counters"},
    {"bench", vqkv::cli::RunBench, "put/get throughput and latency against vqkvd"},
};

void PrintUsage() {
  std::printf("usage: vqkv COMMAND [flags]   (vqkv COMMAND --help for its flags)\n\ncommands:\n");
  for (const auto& c : kCommands) std::printf("  %-10s %s\n", c.name, c.help);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    PrintUsage();
    return argc < 2 ? 2 : 0;
  }
  for (const auto& c : kCommands) {
    if (std::string(argv[1]) == c.name) return c.run(argc, argv);
  }
  std::fprintf(stderr, "vqkv: unknown command '%s'\n\n", argv[1]);
  PrintUsage();
  return 2;
}
