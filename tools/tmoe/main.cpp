// tmoe: the command-line tool. Each command group lives in its own file; this one wires them up and
// maps failures to exit codes: 0 ok, 1 bad input (the user's to fix), 2 usage, 3 internal error.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <new>

#include "common.hpp"
#include "tmoe/error.hpp"

namespace {

int report(const char* message, int code) {
  std::fprintf(stderr, "tmoe: error: %s\n", message);
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tmoe: Mixture-of-Experts layers over Trellis 3-bit weights (CPU and CUDA)", "tmoe"};
  app.require_subcommand(1);
  tmoe::cli::register_demo(app);
  tmoe::cli::register_model_commands(app);
  tmoe::cli::register_run_commands(app);
  tmoe::cli::register_bench(app);

  try {
    app.parse(argc, argv);  // runs the chosen command's callback
    return 0;
  } catch (const CLI::Success& e) {  // --help
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "tmoe: error: %s\nRun 'tmoe --help' or 'tmoe <command> --help' for usage.\n",
                 e.what());
    return 2;
  } catch (const tmoe::Error& e) {
    return report(e.what(), e.kind() == tmoe::ErrorKind::bad_input ? 1 : 3);
  } catch (const std::filesystem::filesystem_error& e) {
    return report(e.what(), 1);
  } catch (const std::bad_alloc&) {
    return report("out of memory", 3);
  } catch (const std::exception& e) {
    return report(e.what(), 3);
  }
}
