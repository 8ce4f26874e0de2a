import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "Streaming text to clients, one token at a time: spaces   tabs\tand\nnewlines.",
    "你好，世界。今天天气很好。我们一起去公园散步吧。日本語のテキストも少し。",
    "Emoji: 😀 🎉 👍🏽 🚀 — café, naïve, façade, “curly quotes”, ümlaut, Ωμέγα.",
    "def add(a, b):\n    return a + b  # numbers 0123456789 and symbols <>[]{}()",
]


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (GPT-2 style) with two special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>"
    )
