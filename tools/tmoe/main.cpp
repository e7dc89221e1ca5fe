// Placeholder until the CLI lands.
#include <cstdio>
int main() { std::puts("tmoe: CLI not built yet"); return 2; }
