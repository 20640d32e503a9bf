"""The eager ground truth: the reference language model (lm), vision side (media), gated
cross-attention (xattn) and the Flamingo model with its builders (model). The fast path in
runtime/ is checked against these modules."""
