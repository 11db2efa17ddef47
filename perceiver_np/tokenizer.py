"""The byte tokenizer of DeepMind's language Perceiver, equal to ``transformers.PerceiverTokenizer``.

::

    tok = ByteTokenizer()
    batch = tok.encode(["Hello", "wörld"], padding="longest")   # input_ids, attention_mask [B, N]
    text = tok.decode(batch["input_ids"][0], skip_special_tokens=True)
    masked = tok.mask_span("This is an incomplete sentence where some words are missing.", 51, 60,
                           padding="max_length")               # " missing." -> 9 [MASK] ids

Ids 0-5 are the special tokens [PAD], [BOS], [EOS], [MASK], [CLS], [SEP]; id ``6 + b`` is the
byte ``b`` of the text's UTF-8 encoding (262 ids in all). A sequence is ``[CLS] bytes [SEP]``.
As in HF, the literal text of a special token inside a string ("[MASK]", case-sensitive) becomes
that token's id, not its 6 bytes; decoding writes the token's text back. Invalid UTF-8 decodes
with U+FFFD replacement characters (``errors="replace"``), as HF does.

Where HF silently does something else, this module raises a ValueError naming the argument:
``max_length`` without ``truncation=True`` or ``padding="max_length"`` (HF truncates when
``truncation`` is not given, ignores it when it is False); a ``max_length`` too short for the
two special tokens (HF returns a sequence longer than ``max_length``); texts of different
lengths without padding, or longer than ``max_length`` with ``padding="max_length"`` and no
truncation (HF returns ragged lists, which are not an array); an id outside 0-261 in decode.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["NUM_SPECIAL_TOKENS", "SPECIAL_TOKENS", "VOCAB_SIZE", "ByteTokenizer"]

#: Special token text -> id, as PerceiverTokenizer numbers them.
SPECIAL_TOKENS = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[MASK]": 3, "[CLS]": 4, "[SEP]": 5}
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
VOCAB_SIZE = NUM_SPECIAL_TOKENS + 256
_SPECIAL_TEXT = {i: t.encode("utf-8") for t, i in SPECIAL_TOKENS.items()}
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_PADDINGS = (False, True, "longest", "max_length")


class ByteTokenizer:
    """UTF-8 bytes offset by 6, with the special tokens of ``transformers.PerceiverTokenizer``."""

    pad_id, bos_id, eos_id, mask_id, cls_id, sep_id = range(NUM_SPECIAL_TOKENS)
    vocab_size = VOCAB_SIZE
    #: HF's ``model_max_length``: what ``truncation=True`` and ``padding="max_length"`` use when
    #: ``max_length`` is None (the language Perceiver's 2048 input positions).
    model_max_length = 2048

    def tokenize(self, text: str, *, name: str = "text") -> list[int]:
        """The ids of ``text`` without [CLS] and [SEP]: literal special-token texts become their
        ids, everything else its UTF-8 bytes + 6."""
        if not isinstance(text, str):
            raise TypeError(f"{name}: expected a str, got {type(text).__name__}")
        ids: list[int] = []
        pos = 0
        for match in [*_SPECIAL_RE.finditer(text), None]:
            end = len(text) if match is None else match.start()
            try:
                ids.extend(b + NUM_SPECIAL_TOKENS for b in text[pos:end].encode("utf-8"))
            except UnicodeEncodeError as exc:
                raise ValueError(f"{name}: character {pos + exc.start} ({text[pos + exc.start]!r}) cannot be "
                                 "encoded as UTF-8 (a lone surrogate)") from exc
            if match is not None:
                ids.append(SPECIAL_TOKENS[match.group()])
                pos = match.end()
        return ids

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        padding: bool | str = False,
        truncation: bool = False,
    ) -> dict[str, np.ndarray]:
        """``{"input_ids": [B, N] int64, "attention_mask": [B, N] int64}`` for one text (B = 1) or
        a list of texts, as ``PerceiverTokenizer()(texts, ...)`` returns them with the same
        arguments.

        ``add_special_tokens``: ``[CLS] ... [SEP]`` around each text. ``truncation=True``: keep
        the first ``max_length`` ids (default :attr:`model_max_length`), special tokens included
        (the text's ids are cut, [SEP] stays). ``padding``: False (all texts must then have the
        same length), ``"longest"`` (or True) pads with [PAD] to the longest, ``"max_length"`` to
        ``max_length`` (default :attr:`model_max_length`); attention_mask is 0 on padding.
        """
        rows = [self.tokenize(t, name=n) for n, t in self._batch(texts)]
        return self._finish(rows, add_special_tokens=add_special_tokens, max_length=max_length,
                            padding=padding, truncation=truncation)

    def __call__(self, texts: str | Sequence[str], **options: Any) -> dict[str, np.ndarray]:
        """:meth:`encode`."""
        return self.encode(texts, **options)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """The text of one sequence of ids ``[N]``, as ``PerceiverTokenizer.decode`` writes it: the
        bytes decoded as UTF-8 with ``errors="replace"`` (an invalid byte, or a truncated
        character, becomes U+FFFD), special tokens written as their text (``"[CLS]"``) or left
        out with ``skip_special_tokens``."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"ids: expected one sequence of integer ids [N], got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= VOCAB_SIZE))
        if bad.size:
            raise ValueError(f"ids: {bad.size} id(s) outside 0..{VOCAB_SIZE - 1}, the first "
                             f"{int(arr[bad[0]])} at position {int(bad[0])}")
        out = bytearray()
        for i in arr.tolist():
            if i >= NUM_SPECIAL_TOKENS:
                out.append(i - NUM_SPECIAL_TOKENS)
            elif not skip_special_tokens:
                out += _SPECIAL_TEXT[i]
        return out.decode("utf-8", errors="replace")

    def mask_span(self, text: str, start: int, end: int, **options: Any) -> dict[str, np.ndarray]:
        """:meth:`encode` of ``text`` (``options`` as there) with every id of the characters
        ``text[start:end]`` replaced by [MASK]: one [MASK] a byte (the language Perceiver predicts
        bytes). HF's fill-mask example, ``input_ids[0, 52:61] = mask_token_id`` for
        "This is an incomplete sentence where some words are missing." (" missing."; position 0
        is [CLS]), is ``mask_span(text, 51, 60, padding="max_length")``."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if not 0 <= start < end <= len(text):
            raise ValueError(f"start, end: expected 0 <= start < end <= len(text) = {len(text)}, "
                             f"got start={start}, end={end}")
        head, span, tail = (self.tokenize(part) for part in (text[:start], text[start:end], text[end:]))
        if head + span + tail != self.tokenize(text):
            raise ValueError(f"start, end: the range {start}:{end} cuts through the text of a special token "
                             f"({', '.join(SPECIAL_TOKENS)}) in text")
        return self._finish([head + [self.mask_id] * len(span) + tail], **options)

    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _batch(texts: object) -> list[tuple[str, str]]:
        if isinstance(texts, str):
            return [("texts", texts)]
        if not isinstance(texts, (list, tuple)) or not texts:
            raise TypeError(f"texts: expected a str or a non-empty list of str, got {texts!r:.100}")
        return [(f"texts[{i}]", t) for i, t in enumerate(texts)]

    def _finish(
        self,
        rows: list[list[int]],
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        padding: bool | str = False,
        truncation: bool = False,
    ) -> dict[str, np.ndarray]:
        """Special tokens, truncation and padding of each row of ids, as HF applies them."""
        if padding not in _PADDINGS or not isinstance(padding, (bool, str)):
            raise ValueError(f"padding: expected one of {_PADDINGS}, got {padding!r}")
        if not isinstance(truncation, bool):
            raise TypeError(f"truncation: expected True or False, got {truncation!r}")
        extra = 2 if add_special_tokens else 0
        if max_length is not None:
            ok = isinstance(max_length, (int, np.integer)) and not isinstance(max_length, bool)
            if not ok or max_length < 1:
                raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
            if not truncation and padding != "max_length":
                raise ValueError("max_length: has no effect without truncation=True or padding='max_length' "
                                 "(HF would truncate when truncation is not given; say so explicitly)")
        limit = self.model_max_length if max_length is None else int(max_length)
        if truncation:
            if limit < extra:
                raise ValueError(f"max_length: {limit} leaves no room for [CLS] and [SEP]; "
                                 "expected at least 2")
            rows = [r[: limit - extra] for r in rows]
        if add_special_tokens:
            rows = [[self.cls_id, *r, self.sep_id] for r in rows]
        longest = max(len(r) for r in rows)
        if padding == "max_length":
            if longest > limit:
                i = next(i for i, r in enumerate(rows) if len(r) == longest)
                raise ValueError(f"texts[{i}]: {longest} ids, longer than max_length={limit} "
                                 "(padding='max_length' without truncation=True)")
            width = limit
        elif padding:
            width = longest
        else:
            if any(len(r) != longest for r in rows):
                raise ValueError(f"texts: of different lengths ({sorted({len(r) for r in rows})} ids) and "
                                 "padding=False; pass padding='longest' to batch them")
            width = longest
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)  # [B, N]
        mask = np.zeros((len(rows), width), dtype=np.int64)  # [B, N]
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            mask[b, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}
