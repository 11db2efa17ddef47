"""perceiver_np.tokenizer.ByteTokenizer against transformers.PerceiverTokenizer: the same ids,
masks and decoded text for ASCII, multi-byte UTF-8, emoji, empty strings, literal special-token
text and invalid UTF-8; batches padded and truncated alike; the fill-mask example of HF's docs;
and a ValueError naming the argument wherever HF silently does something else."""

from __future__ import annotations

import re

import numpy as np
import pytest

from perceiver_np.tokenizer import NUM_SPECIAL_TOKENS, SPECIAL_TOKENS, VOCAB_SIZE, ByteTokenizer

TOK = ByteTokenizer()

STRINGS = [
    "",
    "a",
    "hello world",
    "This is an incomplete sentence where some words are missing.",
    "é",
    "naïve café",
    "combining e\u0301 vs precomposed \u00e9",  # no Unicode normalisation: different bytes
    "日本語のテキスト",
    "emoji 😀👍🏽 and a family 👨\u200d👩\u200d👧",
    "\x00\x01\x7f\x80",
    "tab\tnew\nline\r\n",
    "  leading and trailing  ",
    "\u00a0no-break\u2028line separator\ufeffBOM",
    "a . b , do n't I 'm",  # no clean-up of tokenization spaces
    "[MASK]",
    "a[MASK]b",
    " [MASK] ",
    "[MASK][MASK]",
    "[[MASK]]",
    "[mask] [Mask]",  # case-sensitive: bytes
    "x[MASK",
    "[PAD][BOS][EOS][CLS][SEP]",
    "Ünïcödé [SEP] mixed [CLS]",
    "[UNK] <unk> <s></s>",
    "x" * 300,
]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers",
                                       reason="transformers' PerceiverTokenizer is the reference")
    return transformers.PerceiverTokenizer()


def random_strings(rng, count=40):
    """Random text from ASCII, Latin-1, CJK, emoji and the special-token texts."""
    pieces = [*SPECIAL_TOKENS, "[", "]", "MASK", " ", "\n"]
    ranges = [(0x20, 0x7F), (0x00, 0x20), (0xA0, 0x250), (0x4E00, 0x4F00), (0x1F600, 0x1F650)]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(int(rng.integers(0, 12))):
            if rng.random() < 0.2:
                parts.append(pieces[int(rng.integers(len(pieces)))])
            else:
                lo, hi = ranges[int(rng.integers(len(ranges)))]
                parts.append("".join(chr(int(c)) for c in rng.integers(lo, hi, size=int(rng.integers(1, 6)))))
        out.append("".join(parts))
    return out


def hf_ids(hf, text, **kw):
    enc = hf(text, return_tensors="np", **kw)
    return enc["input_ids"], enc["attention_mask"]


def assert_same_encoding(ours, hf_enc):
    ids, mask = hf_enc
    assert ours["input_ids"].dtype == np.int64 and ours["attention_mask"].dtype == np.int64
    assert ours["input_ids"].tolist() == ids.tolist()
    assert ours["attention_mask"].tolist() == mask.tolist()


# --- against HF ---------------------------------------------------------------------------------


def test_the_vocabulary_is_hf_s(hf):
    assert VOCAB_SIZE == 262 == hf.vocab_size + NUM_SPECIAL_TOKENS
    for text, i in SPECIAL_TOKENS.items():
        assert hf.convert_tokens_to_ids(text) == i
    assert (TOK.pad_id, TOK.mask_id, TOK.cls_id, TOK.sep_id) == (
        hf.pad_token_id, hf.mask_token_id, hf.cls_token_id, hf.sep_token_id)
    assert TOK.model_max_length == hf.model_max_length


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_hf_one_text_at_a_time(hf, rng, add_special_tokens):
    for text in STRINGS + random_strings(rng):
        ours = TOK.encode(text, add_special_tokens=add_special_tokens)
        assert ours["input_ids"].shape[0] == 1
        theirs = hf(text, add_special_tokens=add_special_tokens)
        assert ours["input_ids"][0].tolist() == theirs["input_ids"], repr(text)
        assert ours["attention_mask"][0].tolist() == theirs["attention_mask"], repr(text)


def test_literal_special_token_text_becomes_its_id(hf):
    assert TOK.encode("a[MASK]b")["input_ids"].tolist() == [[4, 6 + ord("a"), 3, 6 + ord("b"), 5]]
    assert TOK.encode("[mask]")["input_ids"].shape == (1, 8)  # not special: 6 bytes
    assert hf("a[MASK]b")["input_ids"] == [4, 103, 3, 104, 5]


@pytest.mark.parametrize("skip", [False, True])
def test_decode_equals_hf(hf, rng, skip):
    for text in STRINGS + random_strings(rng):
        ids = TOK.encode(text)["input_ids"][0]
        assert TOK.decode(ids, skip_special_tokens=skip) == hf.decode(ids.tolist(), skip_special_tokens=skip)
    # random ids: invalid UTF-8, truncated characters, special tokens in the middle of a character
    for _ in range(200):
        ids = rng.integers(0, VOCAB_SIZE, size=int(rng.integers(0, 20)))
        if rng.random() < 0.5:  # mostly high bytes: many invalid sequences
            ids = np.where(ids < 6, ids, rng.integers(6 + 0x80, VOCAB_SIZE, size=ids.shape))
        assert TOK.decode(ids, skip_special_tokens=skip) == hf.decode(ids.tolist(), skip_special_tokens=skip)


def test_decode_replaces_invalid_utf8_as_hf_does(hf):
    for ids in ([6 + 0xFF], [6 + 0xC3], [6 + 0xE2, 6 + 0x82, 3, 6 + 0xAC], [6 + 0xED, 6 + 0xA0, 6 + 0x80],
                [6 + 0xF0, 6 + 0x9F, 6 + 0x98, 6 + 0x80, 6 + 0xC3]):
        assert TOK.decode(ids) == hf.decode(ids)
    assert TOK.decode([6 + 0xE2, 6 + 0x82, 3, 6 + 0xAC]) == "\ufffd[MASK]\ufffd"


def test_decode_round_trips_every_text():
    """Back to the text, less its literal special-token texts (skipped as the tokens they became)."""
    for text in STRINGS:
        without = re.sub(r"\[(PAD|BOS|EOS|MASK|CLS|SEP)\]", "", text)
        assert TOK.decode(TOK.encode(text)["input_ids"][0], skip_special_tokens=True) == without
        assert TOK.decode(TOK.encode(text, add_special_tokens=False)["input_ids"][0]) == text


def test_batches_pad_as_hf_does(hf, rng):
    texts = STRINGS[:12] + random_strings(rng, 8)
    assert_same_encoding(TOK.encode(texts, padding="longest"), hf_ids(hf, texts, padding="longest"))
    assert_same_encoding(TOK.encode(texts, padding=True), hf_ids(hf, texts, padding=True))
    assert_same_encoding(TOK.encode(texts, padding="max_length", max_length=200),
                         hf_ids(hf, texts, padding="max_length", max_length=200))
    assert_same_encoding(TOK.encode(["", "ab"], padding="longest", add_special_tokens=False),
                         hf_ids(hf, ["", "ab"], padding="longest", add_special_tokens=False))


def test_padding_max_length_defaults_to_2048_as_hf_does(hf):
    assert_same_encoding(TOK.encode(["hi", "there"], padding="max_length"),
                         hf_ids(hf, ["hi", "there"], padding="max_length"))
    assert TOK.encode("hi", padding="max_length")["input_ids"].shape == (1, 2048)


@pytest.mark.parametrize("max_length", [2, 3, 7, 8, 30])
@pytest.mark.parametrize("padding", [False, "longest", "max_length"])
def test_truncation_equals_hf(hf, max_length, padding):
    texts = ["abcdefg", "é😀é😀", "[MASK]xyz[SEP]abc"]
    kw = dict(max_length=max_length, truncation=True, padding=padding)
    if padding is False:
        for text in texts:
            assert_same_encoding(TOK.encode(text, **kw), hf_ids(hf, text, **kw))
    else:
        assert_same_encoding(TOK.encode(texts, **kw), hf_ids(hf, texts, **kw))
    for text in texts:  # without special tokens max_length may be 1
        kw = dict(max_length=max_length - 1, truncation=True, add_special_tokens=False)
        assert_same_encoding(TOK.encode(text, **kw), hf_ids(hf, text, **kw))


def test_truncation_without_max_length_keeps_2048_ids_as_hf_does(hf):
    text = "x" * 3000
    ours = TOK.encode(text, truncation=True)
    assert ours["input_ids"].shape == (1, 2048)
    assert ours["input_ids"][0].tolist() == hf(text, truncation=True)["input_ids"]


def test_the_fill_mask_example_of_hf_s_docs(hf):
    """HF's docs: encode with padding="max_length", then ``input_ids[0, 52:61] = mask_token_id``."""
    text = "This is an incomplete sentence where some words are missing."
    ids, mask = hf_ids(hf, text, padding="max_length")
    ids[0, 52:61] = hf.mask_token_id
    assert text[51:60] == " missing."
    assert_same_encoding(TOK.mask_span(text, 51, 60, padding="max_length"), (ids, mask))


def test_mask_span_masks_every_byte_of_multibyte_characters():
    text = "héllo wörld 😀!"
    got = TOK.mask_span(text, 6, 13)["input_ids"][0].tolist()  # "wörld 😀": 11 bytes
    prefix = len("héllo ".encode())
    assert got[1 + prefix: 1 + prefix + 11] == [TOK.mask_id] * 11
    assert TOK.decode(got) == "[CLS]héllo " + "[MASK]" * 11 + "![SEP]"
    assert len(got) == 2 + len(text.encode())


def test_mask_span_over_literal_special_text_masks_its_one_id():
    got = TOK.mask_span("a[SEP]b", 1, 6, add_special_tokens=False)["input_ids"][0].tolist()
    assert got == [6 + ord("a"), TOK.mask_id, 6 + ord("b")]


# --- where HF silently does something else, or the argument is wrong -----------------------------


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: TOK.encode("abc", max_length=3), ValueError,
     r"^max_length: has no effect without truncation=True"),
    (lambda: TOK.encode(["a", "b"], max_length=3, padding="longest"), ValueError,
     r"^max_length: has no effect"),
    (lambda: TOK.encode("abc", max_length=1, truncation=True), ValueError,
     r"^max_length: 1 leaves no room for \[CLS\] and \[SEP\]"),
    (lambda: TOK.encode("abc", max_length=0, truncation=True), ValueError,
     r"^max_length: expected a positive int"),
    (lambda: TOK.encode("abc", max_length=True, truncation=True), ValueError,
     r"^max_length: expected a positive"),
    (lambda: TOK.encode(["abcdef", "a"], max_length=4, padding="max_length"), ValueError,
     r"^texts\[0\]: 8 ids, longer than max_length=4 \(padding='max_length' without truncation=True\)"),
    (lambda: TOK.encode(["ab", "abc"]), ValueError,
     r"^texts: of different lengths \(\[4, 5\] ids\) and padding=False"),
    (lambda: TOK.encode("ab", padding="max"), ValueError, r"^padding: expected one of"),
    (lambda: TOK.encode("ab", padding=1), ValueError, r"^padding: expected one of"),
    (lambda: TOK.encode("ab", truncation="longest_first"), TypeError, r"^truncation: expected True or False"),
    (lambda: TOK.encode([]), TypeError, r"^texts: expected a str or a non-empty list of str"),
    (lambda: TOK.encode(b"bytes"), TypeError, r"^texts: expected a str or a non-empty list"),
    (lambda: TOK.encode(["ok", 3]), TypeError, r"^texts\[1\]: expected a str, got int"),
    (lambda: TOK.encode("a\ud800b"), ValueError,
     r"^texts: character 1 \('\\ud800'\) cannot be encoded as UTF-8"),
    (lambda: TOK.encode(["x", "[MASK]a\ud800"]), ValueError, r"^texts\[1\]: character 7"),
    (lambda: TOK.decode([4, 262]), ValueError,
     r"^ids: 1 id\(s\) outside 0..261, the first 262 at position 1"),
    (lambda: TOK.decode([-1]), ValueError, r"^ids: 1 id\(s\) outside 0..261, the first -1 at position 0"),
    (lambda: TOK.decode([[4, 5]]), ValueError,
     r"^ids: expected one sequence of integer ids \[N\], got shape \(1, 2\)"),
    (lambda: TOK.decode([1.5]), ValueError, r"^ids: expected one sequence of integer ids"),
    (lambda: TOK.mask_span("abc", 2, 2), ValueError,
     r"^start, end: expected 0 <= start < end <= len\(text\) = 3"),
    (lambda: TOK.mask_span("abc", 0, 4), ValueError, r"^start, end: expected 0 <= start < end"),
    (lambda: TOK.mask_span("abc", 0.0, 2), TypeError, r"^start: expected an int, got float"),
    (lambda: TOK.mask_span("a[MASK]b", 0, 3), ValueError,
     r"^start, end: the range 0:3 cuts through the text of a special token"),
    (lambda: TOK.mask_span(["a"], 0, 1), TypeError, r"^text: expected a str, got list"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_decode_of_nothing_is_empty():
    assert TOK.decode([]) == "" and TOK.decode(np.zeros(0, dtype=np.int64)) == ""


def test_call_is_encode():
    assert TOK("ab", padding="max_length", max_length=5)["input_ids"].tolist() == [[4, 103, 104, 5, 0]]
