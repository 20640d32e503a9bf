"""Drop-in replacements for the families' own models: the shared nn.Module base (module), the
Hugging Face generate surface (hf), OpenFlamingo and IDEFICS v1, and the checkpoint readers
(weights_files, smollm2)."""
