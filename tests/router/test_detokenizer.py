import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from router.detokenizer import IncrementalDetokenizer, text_decoder

_PIECES = [
    "hello", " world", " the", "fox", "  ", "\n", "\t", ",", ".", "!", "123",
    "你好", "世界", "。", "日本語", "😀", "🎉", "👍🏽", "🚀", "café", " naïve", "Ω", "“", "”",
]  # fmt: skip


def _byte_alphabet() -> list[str]:
    """Byte-level BPE writes byte b as the character at index b (GPT-2's byte-to-unicode map)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


_BYTE_CHARS = _byte_alphabet()


def byte_ids(tokenizer, text: str) -> list[int]:
    """One single-byte token per UTF-8 byte of `text`: multi-byte characters get split."""
    return tokenizer.convert_tokens_to_ids([_BYTE_CHARS[b] for b in text.encode()])


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.finish()]


def test_byte_ids_helper_round_trips(bpe_tokenizer):
    assert bpe_tokenizer.decode(byte_ids(bpe_tokenizer, "a 😀 你")) == "a 😀 你"


def test_emoji_split_across_tokens_is_emitted_whole(bpe_tokenizer):
    detok = IncrementalDetokenizer(bpe_tokenizer, encode(bpe_tokenizer, "Hi"))
    deltas = stream(detok, byte_ids(bpe_tokenizer, " 😀!"))
    assert deltas == [" ", "", "", "", "😀", "!", ""]


def test_cjk_split_across_chunks_is_emitted_per_character(bpe_tokenizer):
    detok = IncrementalDetokenizer(bpe_tokenizer, [])
    ids = byte_ids(bpe_tokenizer, "你好")  # 6 bytes, chunks of 2 end mid-character twice
    assert stream(detok, ids, chunk=2) == ["", "你", "好", ""]


def test_text_before_an_unfinished_character_is_not_held(bpe_tokenizer):
    detok = IncrementalDetokenizer(bpe_tokenizer, [])
    ids = encode(bpe_tokenizer, "hello world") + byte_ids(bpe_tokenizer, "😀")[:2]
    assert detok.add(ids) == "hello world"
    assert detok.add(byte_ids(bpe_tokenizer, "😀")[2:]) == "😀"


def test_leading_space_of_first_token_is_kept(bpe_tokenizer):
    prompt = encode(bpe_tokenizer, "Hello")
    detok = IncrementalDetokenizer(bpe_tokenizer, prompt)
    assert "".join(stream(detok, encode(bpe_tokenizer, " world  and\n more"))) == (
        " world  and\n more"
    )


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: a word's leading space is '▁', dropped at the start of a decode."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=100, show_progress=False)
    tokenizer.train_from_iterator(["Hello world again and again, hello world"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_prompt_context_keeps_sentencepiece_leading_space(metaspace_tokenizer):
    prompt = encode(metaspace_tokenizer, "Hello")
    output = encode(metaspace_tokenizer, "Hello world again")[len(prompt) :]
    assert metaspace_tokenizer.decode(output) == "world again"  # no context: space dropped
    detok = IncrementalDetokenizer(metaspace_tokenizer, prompt)
    assert stream(detok, output) == [" world", " again", ""]


def test_special_tokens_are_skipped_by_default(bpe_tokenizer):
    eos = bpe_tokenizer.eos_token_id
    detok = IncrementalDetokenizer(bpe_tokenizer, [bpe_tokenizer.bos_token_id])
    ids = encode(bpe_tokenizer, "the fox") + [eos]
    assert "".join(stream(detok, ids)) == "the fox"


def test_special_tokens_are_kept_when_not_skipped(bpe_tokenizer):
    eos = bpe_tokenizer.eos_token_id
    detok = IncrementalDetokenizer(bpe_tokenizer, [bpe_tokenizer.bos_token_id], False)
    ids = encode(bpe_tokenizer, "the fox") + [eos]
    assert "".join(stream(detok, ids)) == "the fox<|eos|>"


def test_empty_add_returns_empty_text(bpe_tokenizer):
    detok = IncrementalDetokenizer(bpe_tokenizer, encode(bpe_tokenizer, "Hi"))
    assert detok.add([]) == ""
    assert detok.add(encode(bpe_tokenizer, " fox")) == " fox"
    assert detok.add([]) == ""
    assert detok.text == " fox"


def test_text_is_everything_emitted_including_the_flush(bpe_tokenizer):
    detok = IncrementalDetokenizer(bpe_tokenizer, [])
    detok.add(encode(bpe_tokenizer, "fox "))
    detok.add(byte_ids(bpe_tokenizer, "😀")[:3])
    assert detok.text == "fox "
    detok.finish()
    assert detok.text == "fox \ufffd"


def test_model_ending_mid_character_flushes_replacement_char(bpe_tokenizer):
    detok = IncrementalDetokenizer(bpe_tokenizer, [])
    ids = encode(bpe_tokenizer, "ok") + byte_ids(bpe_tokenizer, "世")[:2]
    assert detok.add(ids) == "ok"
    assert detok.finish() == "\ufffd"
    assert detok.text == bpe_tokenizer.decode(ids)


def test_invalid_bytes_do_not_hold_back_the_stream_forever(bpe_tokenizer):
    detok = IncrementalDetokenizer(bpe_tokenizer, [])
    continuation_byte = bpe_tokenizer.convert_tokens_to_ids(_BYTE_CHARS[0x80])
    emitted = detok.add([continuation_byte] * 100)  # never valid UTF-8, always ends in U+FFFD
    assert len(emitted) >= 80
    assert emitted + detok.finish() == "\ufffd" * 100


def test_decode_window_stays_small_for_long_outputs(bpe_tokenizer):
    lengths = []

    class CountingTokenizer:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return bpe_tokenizer.decode(ids, **kwargs)

    rng = random.Random(7)
    text = "".join(rng.choice(_PIECES) for _ in range(2000))
    ids = byte_ids(bpe_tokenizer, text)
    detok = IncrementalDetokenizer(CountingTokenizer(), encode(bpe_tokenizer, "prompt " * 50))
    assert "".join(stream(detok, ids, chunk=3)) == text
    assert max(lengths) <= 10


def _random_output(rng: random.Random, tokenizer, specials: bool) -> list[int]:
    """Tokens of random text; some stretches split into single bytes, some special tokens."""
    ids: list[int] = []
    for _ in range(rng.randrange(0, 25)):
        piece = "".join(rng.choice(_PIECES) for _ in range(rng.randrange(1, 4)))
        ids += byte_ids(tokenizer, piece) if rng.random() < 0.4 else encode(tokenizer, piece)
        if specials and rng.random() < 0.2:
            ids.append(rng.choice(tokenizer.all_special_ids))
    return ids


def _random_chunks(rng: random.Random, ids: list[int]) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        size = rng.choice([0, 1, 1, 2, 3, 5])
        chunks.append(ids[i : i + size])
        i += size
    return chunks


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_full_decode_of_valid_text(bpe_tokenizer, skip_special_tokens):
    rng = random.Random(1234)
    for _ in range(300):
        prompt = _random_output(rng, bpe_tokenizer, specials=True)
        output = _random_output(rng, bpe_tokenizer, specials=True)
        detok = IncrementalDetokenizer(bpe_tokenizer, prompt, skip_special_tokens)
        deltas = [detok.add(chunk) for chunk in _random_chunks(rng, output)]
        assert not any("\ufffd" in delta for delta in deltas)
        deltas.append(detok.finish())
        expected = bpe_tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected == detok.text


def test_deltas_concatenate_to_full_decode_of_arbitrary_ids(bpe_tokenizer):
    # The output may be invalid UTF-8 anywhere; the prompt is text, so it ends on a character.
    rng = random.Random(99)
    vocab = range(len(bpe_tokenizer))
    for _ in range(1000):
        prompt = _random_output(rng, bpe_tokenizer, specials=True)
        output = rng.choices(vocab, k=rng.randrange(0, 40))
        detok = IncrementalDetokenizer(bpe_tokenizer, prompt)
        for chunk in _random_chunks(rng, output):
            detok.add(chunk)
        detok.finish()
        assert detok.text == bpe_tokenizer.decode(output, skip_special_tokens=True)


def test_the_decoder_is_the_backends_own_where_the_wrapper_adds_nothing(
    bpe_tokenizer, monkeypatch
):
    monkeypatch.setattr(bpe_tokenizer, "clean_up_tokenization_spaces", False)
    rng = random.Random(5)
    cases = [rng.choices(range(len(bpe_tokenizer)), k=rng.randrange(0, 8)) for _ in range(500)]
    want = {(tuple(ids), skip): bpe_tokenizer.decode(ids, skip_special_tokens=skip)
            for ids in cases for skip in (True, False)}
    decode = text_decoder(bpe_tokenizer)
    monkeypatch.setattr(bpe_tokenizer, "decode", _not_called)  # the wrapper is bypassed
    for (ids, skip), text in want.items():
        assert decode(list(ids), skip) == text


def test_a_tokenizer_that_cleans_up_spaces_or_decodes_its_own_way_is_called_itself(
    bpe_tokenizer, monkeypatch
):
    monkeypatch.setattr(bpe_tokenizer, "clean_up_tokenization_spaces", True)
    calls = []
    monkeypatch.setattr(bpe_tokenizer, "decode", lambda ids, **kw: calls.append(ids) or "x")
    assert text_decoder(bpe_tokenizer)([5, 6], True) == "x" and calls == [[5, 6]]

    class Shouting(type(bpe_tokenizer)):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):  # type: ignore[override]
            return super()._decode(token_ids, skip_special_tokens, **kwargs).upper()

    shouting = Shouting(tokenizer_object=bpe_tokenizer.backend_tokenizer)
    shouting.clean_up_tokenization_spaces = False
    ids = encode(shouting, "hello world")
    assert text_decoder(shouting)(ids, True) == "HELLO WORLD"
    detok = IncrementalDetokenizer(shouting, [])
    assert "".join(stream(detok, ids)) == "HELLO WORLD"


def _not_called(*args, **kwargs):
    raise AssertionError("tokenizer.decode was called")
