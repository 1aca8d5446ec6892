// `vqkv` subcommands that talk to a running vqkvd: put, get, lookup, stats, bench. Each parses
// its flags from argv[2..] and returns a process exit code (0 ok, 1 runtime error, 2 usage).
// Thread-safety: run from main() only.
#pragma once

namespace vqkv::cli {

int RunPut(int argc, char** argv);
int RunGet(int argc, char** argv);
int RunLookup(int argc, char** argv);
int RunStats(int argc, char** argv);
int RunBench(int argc, char** argv);

}  // namespace vqkv::cli
