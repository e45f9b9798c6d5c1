"""Shared fixtures: tiny random models of several architectures with a tokenizer trained here.

Models are saved as ordinary Hugging Face folders, so every code path that takes a model name
(`load_model(path)`, the CLI's --model) is exercised exactly as a user would run it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paper-release"
ARCHS = ("llama", "qwen2", "gemma3")


def corpus() -> list[str]:
    """Multilingual training text for the tokenizer: the bundled prompts and data, whatever exists."""
    from importlib.resources import files
    texts = []
    root = files("polyalign").joinpath("resources")
    for sub in ("tasks", "data", "questions"):
        base = Path(str(root.joinpath(sub)))
        if base.exists():
            for p in sorted(base.rglob("*")):
                if p.suffix in (".yaml", ".jsonl"):
                    texts.append(p.read_text("utf-8"))
    texts.append("positive negative entailment neutral contradiction same different ox horse goat "
                 "Review Emotion Premise Hypothesis Answer Sentence Translate the input from to English")
    return texts


def train_tokenizer(folder: Path, vocab_size: int = 1200):
    """A SentencePiece-style BPE (▁ marker, byte fallback) saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens,
                                  show_progress=False, initial_alphabet=[])
    tok.train_from_iterator(corpus(), trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                            special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=4096)
    fast.save_pretrained(folder)
    return fast


def train_bytelevel_tokenizer(folder: Path, vocab_size: int = 1500):
    """A GPT-2/Qwen-style byte-level BPE (Ġ marker, no BOS): the other family of vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", model_max_length=4096)
    fast.save_pretrained(folder)
    return fast


def make_model(arch: str, folder: Path, tokenizer, seed: int = 0, max_positions: int = 4096) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "gemma3":
        # Gemma's quirks: scaled embeddings, sliding-window layers and a final logit softcap.
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=32, final_logit_softcapping=30.0,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform outputs; sharpen the head so that scores differ between labels.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(3.0)
            if "norm" in name:  # random norm weights, so that a norm applied twice would show
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_bytelevel_tokenizer(tmp_path_factory):
    return train_bytelevel_tokenizer(tmp_path_factory.mktemp("bltok"))


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model_path(request, tmp_path_factory, tiny_tokenizer, tiny_bytelevel_tokenizer) -> str:
    """A folder holding a tiny random model of each architecture in turn. Qwen2 gets a byte-level
    BPE as the real Qwen does (transformers loads a Qwen2 folder with its own byte-level class)."""
    tok = tiny_bytelevel_tokenizer if request.param == "qwen2" else tiny_tokenizer
    return str(make_model(request.param, tmp_path_factory.mktemp(request.param), tok))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, tiny_tokenizer) -> str:
    return str(make_model("llama", tmp_path_factory.mktemp("llama1"), tiny_tokenizer))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two busy-waiting OpenMP threads
    when the machine is shared; the thread count is restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip("../shared/data/paper-release is absent")
    return SHARED


def gemma_enabled() -> bool:
    return os.environ.get("POLYALIGN_GEMMA_TESTS") == "1"


requires_gemma = pytest.mark.skipif(not gemma_enabled(), reason="set POLYALIGN_GEMMA_TESTS=1 to run the real Gemma")


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path
