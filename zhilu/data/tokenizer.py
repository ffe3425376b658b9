"""The tokenizers of prepared datasets: raw bytes, a byte-level BPE trained here, or a model's ``tokenizer.json``.

    bytes        ids 0-255 are the UTF-8 bytes, 256 ends a document (vocabulary 257)
    bpe:VOCAB    a byte-level BPE of VOCAB ids trained on the dataset with Hugging Face ``tokenizers``;
                 id 0 is ``<|endoftext|>``, which ends each document
    hf:DIR       DIR/tokenizer.json, the tokenizer of a transformers model; its end-of-text id
                 (``eos_token_id`` in DIR/config.json, else ``eos_token`` of tokenizer_config.json) ends documents

Byte-level tokenizers decode what they encode exactly, for any text. A dataset keeps its
tokenizer as ``tokenizer.json`` (JSON, never code); raw bytes need no file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhilu.errors import ZhiluError

FIELD = "--tokenizer"
VALID = "bytes, bpe:VOCAB (VOCAB 258 to 4294967295) or hf:DIR (a directory with tokenizer.json)"
END_OF_TEXT = "<|endoftext|>"
BYTES_VOCAB = 257


@dataclass(frozen=True)
class TokenizerChoice:
    """What ``--tokenizer`` asks for."""

    kind: str  # bytes | bpe | hf
    vocab_size: int = 0  # bpe: the size to train
    directory: str = ""  # hf: the model's directory

    @classmethod
    def parse(cls, text: str) -> TokenizerChoice:
        if text == "bytes":
            return cls("bytes", BYTES_VOCAB)
        if text.startswith("bpe:"):
            try:
                vocab = int(text[4:])
            except ValueError:
                vocab = 0
            if not 258 <= vocab < 2**32:
                raise ZhiluError(FIELD, f"{text!r} needs a vocabulary size of 258 to 4294967295 (256 bytes, "
                                        f"{END_OF_TEXT} and at least one merge); valid: {VALID}")
            return cls("bpe", vocab)
        if text.startswith("hf:"):
            directory = Path(text[3:]).expanduser()
            if not (directory / "tokenizer.json").is_file():
                raise ZhiluError(FIELD, f"{directory} has no tokenizer.json; valid: {VALID}")
            return cls("hf", directory=str(directory))
        raise ZhiluError(FIELD, f"unknown tokenizer {text!r}; valid: {VALID}")

    def __str__(self) -> str:
        return {"bytes": "bytes", "bpe": f"bpe:{self.vocab_size}", "hf": f"hf:{self.directory}"}[self.kind]


class ByteTokenizer:
    """UTF-8 bytes; id 256 ends a document."""

    vocab_size = BYTES_VOCAB
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FileTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (JSON only, no code)."""

    def __init__(self, path: str | Path, eos_id: int | None) -> None:
        Tokenizer = _tokenizers().Tokenizer

        self.path = str(path)
        self.eos_id = eos_id
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:  # the library's own error for a malformed file
            raise ZhiluError(FIELD, f"{path} is not a tokenizer.json the tokenizers library reads ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def __reduce__(self) -> tuple[Any, ...]:  # sent to worker processes as its path
        return (FileTokenizer, (self.path, self.eos_id))


Tokenizer = ByteTokenizer | FileTokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> FileTokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids on ``texts`` and write it to ``out`` (tokenizer.json)."""
    lib = _tokenizers()
    decoders, models, pre_tokenizers, trainers = lib.decoders, lib.models, lib.pre_tokenizers, lib.trainers
    tok = lib.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(tok.to_str())
    tmp.replace(out)
    return FileTokenizer(out, tok.token_to_id(END_OF_TEXT))


def hf_eos_id(directory: Path, tokenizer: FileTokenizer) -> int | None:
    """The end-of-text id of a transformers model directory, or None where it names none."""
    config = _json_or_empty(directory / "config.json")
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int):
        return eos
    token = _json_or_empty(directory / "tokenizer_config.json").get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str):
        return tokenizer._tok.token_to_id(token)
    return None


def load(directory: Path, entry: dict[str, Any]) -> Tokenizer:
    """The tokenizer a dataset's manifest describes (``entry``), from the dataset's directory."""
    if entry["kind"] == "bytes":
        return ByteTokenizer()
    return FileTokenizer(directory / entry["file"], entry.get("eos_id"))


def _tokenizers():  # type: ignore[no-untyped-def]
    try:
        import tokenizers
    except ImportError:
        raise ZhiluError(FIELD, "bpe and hf tokenizers need the tokenizers library: pip install "
                                "'zhilu[data]'") from None
    return tokenizers


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
