// Entry points of the `vqkv` subcommands. Each parses its own flags from argv[2..] and returns
// a process exit code (0 ok, 1 runtime error, 2 usage error).
// Thread-safety: run from main() only.
#pragma once

namespace vqkv::cli {

int RunRatio(int argc, char** argv);
int RunCapture(int argc, char** argv);
int RunFit(int argc, char** argv);
int RunEval(int argc, char** argv);
int RunFidelity(int argc, char** argv);
int RunDemo(int argc, char** argv);

}  // namespace vqkv::cli
