"""Word-level tokenizer of the testbed world, on Hugging Face `tokenizers` (WordLevel model, shipped as JSON).

The vocabulary is every word the caption grammar of :mod:`.world` can produce, after ``<pad>`` (0) and ``<unk>``
(1), in a fixed order; ``python -m ditfa_jax.testbed.tokenizer`` rewrites the shipped ``tokenizer.json`` from the
world's constants (a test checks the two agree). The world is closed, so an unknown word is an error, not ``<unk>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from ditfa_jax.testbed.world import BACKGROUNDS, COLOUR_NAMES, MAX_OBJECTS, REGIONS, SHAPES, SIZES

__all__ = ["MAX_LENGTH", "SHIPPED_TOKENIZER", "vocabulary", "build_tokenizer", "WordTokenizer"]

PAD, UNK = "<pad>", "<unk>"
SHIPPED_TOKENIZER = Path(__file__).parent / "tokenizer.json"


def vocabulary() -> list[str]:
    """Special tokens, then the grammar's words in first-seen order."""
    words = [PAD, UNK, "a", "and", "on", "background"]
    for group in (SIZES, COLOUR_NAMES, SHAPES, BACKGROUNDS, *(r.split() for r in REGIONS)):
        words += [w for w in group if w not in words]
    return words


def _longest_caption() -> int:
    """Words in the longest caption: MAX_OBJECTS of the longest object phrase, 'and's, the background phrase."""
    phrase = 3 + max(len(r.split()) for r in REGIONS) + 1  # a <size> <colour> <shape> <region words>
    return MAX_OBJECTS * phrase + (MAX_OBJECTS - 1) + 4  # "on a <bg> background"


# 32 when the longest caption (30 words) fits, else the smallest multiple of 8 that holds it
MAX_LENGTH = max(32, 8 * -(-_longest_caption() // 8))


def build_tokenizer(words: list[str] | None = None) -> Tokenizer:
    """The WordLevel tokenizer (lowercase, whitespace split) over ``words`` (default: :func:`vocabulary`, as shipped).

    ``words`` must start with ``<pad>``, ``<unk>`` and hold no duplicates (another world's vocabulary, e.g. v2's).
    """
    words = vocabulary() if words is None else list(words)
    if words[:2] != [PAD, UNK] or len(set(words)) != len(words):
        raise ValueError(f"build_tokenizer: words must start with {PAD!r}, {UNK!r} and be distinct")
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


class WordTokenizer:
    """Captions -> word ids [N, max_length] (int32, padded with 0) and a mask (True on words)."""

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
        if not isinstance(tokenizer.model, models.WordLevel):
            raise ValueError(f"{source}: expected a WordLevel tokenizer, got {type(tokenizer.model).__name__}")
        self._tok, self.source = tokenizer, source
        self.unk_id = tokenizer.token_to_id(UNK)
        if tokenizer.token_to_id(PAD) != 0 or self.unk_id is None:
            raise ValueError(f"{source}: expected {PAD!r} at id 0 and an {UNK!r} token")

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> "WordTokenizer":
        """Load a tokenizer JSON (default: the shipped one); errors name the path."""
        path = Path(path) if path is not None else SHIPPED_TOKENIZER
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
        return cls(tok, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: list[str] | str, max_length: int = MAX_LENGTH, *, allow_unknown: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """Word ids int32 [N, max_length] padded with 0, and mask bool (True on words); errors on unknown
        words (unless ``allow_unknown``, which maps them to ``<unk>``) and on captions over ``max_length``."""
        if max_length < 1:
            raise ValueError(f"max_length: expected a positive number of tokens, got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.zeros((len(texts), max_length), np.int32)
        for i, enc in enumerate(self._tok.encode_batch(texts)):
            if not allow_unknown and self.unk_id in enc.ids:
                word = texts[i][slice(*enc.offsets[enc.ids.index(self.unk_id)])]
                raise ValueError(f"caption {texts[i]!r}: unknown word {word!r} (the testbed world's vocabulary has "
                                 f"{self.vocab_size} words; see ditfa_jax.testbed.world)")
            if len(enc.ids) > max_length:
                raise ValueError(f"caption {texts[i]!r} has {len(enc.ids)} words, more than max_length={max_length}")
            ids[i, :len(enc.ids)] = enc.ids
        return ids, ids != 0

    def decode(self, ids) -> list[str]:
        """Captions back from ids [N, L] or [L] (padding dropped), for debugging."""
        return [self._tok.decode([int(t) for t in row if t != 0]) for row in np.atleast_2d(ids)]


if __name__ == "__main__":
    build_tokenizer().save(str(SHIPPED_TOKENIZER), pretty=True)
    print(f"wrote {SHIPPED_TOKENIZER} ({len(vocabulary())} words, MAX_LENGTH {MAX_LENGTH})")
