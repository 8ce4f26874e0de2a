"""The test model's tokenizer: byte-level BPE trained on a committed corpus.

The corpus (``testmodel_corpus.txt``) is original text shipped with the package, so training gives
the same merges on every machine; nothing is downloaded. Byte-level BPE means every string,
including CJK and emoji, round-trips, and multi-byte characters split across tokens exercise the
server's incremental detokenization. Special tokens follow Llama 3 names; BOS is prepended by the
tokenizer.json post-processor, as Llama does, so every Hugging Face client sees the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The trainer gives special tokens the first ids, in this order: BOS=0, EOS=1, PAD=2, ...
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)

CORPUS_PATH = Path(__file__).with_name("testmodel_corpus.txt")

def chatml_template(image: str | None = None) -> str:
    """ChatML turns. The template starts with BOS because transformers' apply_chat_template
    encodes with add_special_tokens=False (Llama 3 does the same); a server that renders the
    template must then encode without adding special tokens, or BOS appears twice. ``image``:
    what an image part (transformers' {"type": "image"}, OpenAI's {"type": "image_url"}) renders
    as, the placeholder a vision model's processor expands; None: text parts only."""
    image_part = ("" if image is None else
                  "{%- elif part['type'] in ('image', 'image_url') %}{{- '" + image + "' }}")
    return (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}"
        "{{- message['content'] }}"
        "{%- else %}"
        "{%- for part in message['content'] %}"
        "{%- if part['type'] == 'text' %}{{- part['text'] }}" + image_part + "{%- endif %}"
        "{%- endfor %}"
        "{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


CHAT_TEMPLATE = chatml_template()


def train_tokenizer(vocab_size: int, extra_specials: tuple[str, ...] = ()) -> Tokenizer:
    """Train byte-level BPE on the corpus to exactly ``vocab_size`` ids (specials included).

    Exact size matters: the model's embedding has ``vocab_size`` rows, and an id the tokenizer
    cannot decode would be a valid greedy pick for random weights. ``extra_specials`` (a vision
    model's ``<image>``) take the ids after :data:`SPECIAL_TOKENS`.
    """
    specials = [*SPECIAL_TOKENS, *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Paragraphs as training items: a fixed, ordered input, so the merges are reproducible.
    text = CORPUS_PATH.read_text(encoding="utf-8")
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    got = tok.get_vocab_size()
    assert got == vocab_size, f"corpus too small for {vocab_size} tokens: got {got}"
    for i, special in enumerate(specials):
        assert tok.token_to_id(special) == i, special
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, 0)],
            ),
        ]
    )
    return tok


def write_tokenizer_files(
    tok: Tokenizer, out_dir: Path, model_max_length: int, extra_specials: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    tokenizer_config.json names the generic fast tokenizer class: LlamaTokenizer(Fast) would
    rebuild a SentencePiece-style pipeline and ignore this byte-level one. It sets no
    ``add_bos_token``, which would make transformers replace the post-processor: BOS lives in
    tokenizer.json only.
    """
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    added = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate((*SPECIAL_TOKENS, *extra_specials))
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END, *extra_specials],
        "bos_token": BOS,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_map = {
        "additional_special_tokens": [IM_START, IM_END, *extra_specials],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
    }
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json", special_map)


def write_json(path: Path, obj: object) -> None:
    """Write JSON with sorted keys and a trailing newline, so equal content is equal bytes."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")
