"""CLIP and T5 prompt tokenizers read from a diffusers tokenizer folder, with the `tokenizers` library only.

They rebuild the backend exactly as transformers 5's `CLIPTokenizer` / `T5TokenizerFast` do (their `__init__`
replaces whatever pipeline a tokenizer.json carries), so ids match transformers': CLIP is byte-level BPE with `</w>`
word ends, NFC + whitespace collapse + lowercasing, `<|startoftext|> ... <|endoftext|>`; T5 is the SentencePiece
unigram model with `... </s>`. Calls pad to `max_length` and truncate as the diffusers pipelines ask
(`padding="max_length", truncation=True`), warning with the cut's size and its first and last words when a prompt
is cut.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = ["PromptTokenizer", "load_tokenizer"]

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>"}
T5_DEFAULTS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def _special_tokens(folder: Path, defaults: dict) -> dict:
    """Special tokens and model_max_length: defaults < tokenizer_config.json < special_tokens_map.json."""
    found = dict(defaults)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            raw = json.loads(path.read_text(encoding="utf-8"))
            for key in (*defaults, "model_max_length"):
                value = raw.get(key)
                if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
                    value = value.get("content")
                if value is not None:
                    found[key] = value
    return found


def shorten(text: str, first: int = 6, last: int = 3) -> str:
    """`text` with its middle words elided when it has more than first + last words (for one-line warnings)."""
    words = text.split()
    if len(words) <= first + last:
        return " ".join(words)
    return f"{' '.join(words[:first])} ... {' '.join(words[-last:])}"


class PromptTokenizer:
    """Prompts -> int32 ids [B, max_length], padded and truncated as transformers does for the pipelines."""

    def __init__(self, backend: Tokenizer, *, kind: str, pad_token: str, model_max_length: int | None,
                 source: Path):
        self.backend, self.kind, self.source = backend, kind, source
        self.pad_token, self.model_max_length = pad_token, model_max_length
        self.pad_id = backend.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"{source}: pad token {pad_token!r} is not in the vocabulary")

    def __repr__(self):
        return f"PromptTokenizer({self.kind}, vocab {self.vocab_size}, pad {self.pad_token!r}, {self.source})"

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = max_length or self.model_max_length
        if not max_length:
            raise ValueError(f"{self.source}: no model_max_length in tokenizer_config.json; pass max_length")
        self.backend.no_padding()
        self.backend.no_truncation()
        full = self.backend.encode_batch(prompts)
        for i, enc in enumerate(full):
            if len(enc.ids) > max_length:
                removed = enc.ids[max_length - 1:-1]
                text = self.decode(removed)
                warnings.warn(f"{self.kind} tokenizer: prompt {i} is longer than {max_length} tokens; {len(removed)} "
                              f"token(s) cut ({len(text.split())} words): {shorten(text)!r}", stacklevel=3)
        self.backend.enable_truncation(max_length)
        self.backend.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
        ids = np.array([enc.ids for enc in self.backend.encode_batch(prompts)], np.int32)
        self.backend.no_padding()
        self.backend.no_truncation()
        return ids.reshape(len(prompts), max_length)

    def decode(self, ids) -> str:
        text = self.backend.decode(list(ids))
        return text.replace("</w>", " ").strip() if self.kind == "clip" else text


def _clip_vocab_merges(folder: Path) -> tuple[dict, list[tuple[str, str]]]:
    if (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{folder / 'tokenizer.json'}: model type {model.get('type')!r}, expected a CLIP BPE")
        merges = model.get("merges", [])
        return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        raise FileNotFoundError(f"{folder}: a CLIP tokenizer needs vocab.json + merges.txt (or tokenizer.json); "
                                f"found {sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'no folder'}")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in merges_file.read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{merges_file}: expected 'left right' pairs per line, got {bad[:3]}")
    return vocab, merges


def _clip(folder: Path) -> PromptTokenizer:
    special = _special_tokens(folder, CLIP_DEFAULTS)
    vocab, merges = _clip_vocab_merges(folder)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=special["unk_token"]))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    tokens = dict.fromkeys(special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    ids = {k: backend.token_to_id(special[k]) for k in ("bos_token", "eos_token")}
    missing = [special[k] for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"{folder}: special tokens {missing} are not in the vocabulary")
    backend.post_processor = processors.RobertaProcessing((special["eos_token"], ids["eos_token"]),
                                                          (special["bos_token"], ids["bos_token"]), False, False)
    return PromptTokenizer(backend, kind="clip", pad_token=special["pad_token"],
                           model_max_length=special.get("model_max_length"), source=folder)


def _t5(folder: Path) -> PromptTokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        hint = (" (only the SentencePiece spiece.model is there: tokenizer.json is required; make it once with "
                "transformers' T5TokenizerFast.from_pretrained(folder).save_pretrained(folder))"
                if "spiece.model" in have else "")
        raise FileNotFoundError(f"{folder}: a T5 tokenizer needs tokenizer.json{hint}; found {have}")
    special = _special_tokens(folder, T5_DEFAULTS)
    backend = Tokenizer.from_file(str(path))
    if json.loads(backend.model.__getstate__()).get("type") != "Unigram":
        raise ValueError(f"{path}: expected a SentencePiece unigram model (T5)")
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                                   split=True)])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    eos_id = backend.token_to_id(special["eos_token"])
    if eos_id is None:
        raise ValueError(f"{path}: eos token {special['eos_token']!r} is not in the vocabulary")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", special["eos_token"]], pair=["$A", special["eos_token"], "$B", special["eos_token"]],
        special_tokens=[(special["eos_token"], eos_id)])
    return PromptTokenizer(backend, kind="t5", pad_token=special["pad_token"],
                           model_max_length=special.get("model_max_length"), source=folder)


def load_tokenizer(folder: str | Path, kind: str) -> PromptTokenizer:
    """The tokenizer of a diffusers tokenizer folder; kind "clip" or "t5"."""
    folder = Path(folder)
    if kind not in ("clip", "t5"):
        raise ValueError(f"tokenizer kind {kind!r}: expected 'clip' or 't5'")
    return _clip(folder) if kind == "clip" else _t5(folder)
