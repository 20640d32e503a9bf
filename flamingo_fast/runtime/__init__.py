"""The fast path: FastFlamingo (runtime), its options (options), prefill and decode as functions
of explicit state, the layers that are the one door to kernels/ (layers), the KV and context
caches, decode graphs, int8 weights, fused weights and the weight watch."""
