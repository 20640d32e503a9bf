"""Generation over the decoder interface, shared by the reference and the runtime: greedy and
beam search with the generate options (search), token sampling (sampling) and candidate
scoring (scoring)."""
