// Placeholder until the benchmark drivers land.
namespace tmoe::bench {}
