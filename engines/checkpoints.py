"""Checkpoints the project generates itself, for offline defaults and tests.

A config names one as ``source: generated:tiny-llama``; :func:`resolve_source` turns that into a
directory in the cache (``$MMSERVE_CACHE_DIR``, default ``~/.cache/mmserve``), generating it on
first use. The directory is an ordinary Hugging Face checkpoint, so engines load it through the
same code path as a hub id. Generation is deterministic (fixed seeds, fixed corpus).

``python -m engines.checkpoints tiny-llama`` generates it ahead of time and prints its path.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

PREFIX = "generated:"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving framework routes each request to a model,
runs preprocessing, inference and postprocessing, and returns the result to the client.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / +
def hello(name): return f"Hello, {name}!"  # code is text too
user: What is the capital of France? assistant: Paris is the capital of France.
Audio, vision, video and text are modalities; each one is a pipeline of nodes.
"""


def cache_dir() -> Path:
    return Path(os.environ.get("MMSERVE_CACHE_DIR", Path.home() / ".cache" / "mmserve"))


def make_tiny_llama(out: Path) -> None:
    """A 2-layer Llama (hidden 256, 4 heads of 64, vocabulary 512) with a byte-level BPE tokenizer
    and a chat template. Random weights: the text is gibberish, the machinery is real."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)


GENERATORS: dict[str, Callable[[Path], None]] = {"tiny-llama": make_tiny_llama}


def resolve_source(source: str) -> str:
    """A hub id or path unchanged; ``generated:<name>`` as its cache directory (made if missing).

    Raises:
        ValueError: ``<name>`` is not a known generated checkpoint.
    """
    if not source.startswith(PREFIX):
        return source
    name = source[len(PREFIX):]
    if name not in GENERATORS:
        raise ValueError(f"unknown generated checkpoint {name!r}; known: {', '.join(GENERATORS)}")
    target = cache_dir() / "checkpoints" / name
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several replicas may start at once
        if not (target / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
            GENERATORS[name](tmp)
            (tmp / ".complete").touch()
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    return str(target)


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(GENERATORS):
        print(resolve_source(PREFIX + arg))
