"""Byte-level BPE tokenizer: train with `tokenizers`, save/load any HF tokenizer.json.

Byte-level pre-tokenization over the full 256-byte alphabet makes encode→decode
lossless for any Unicode text, so the model never sees an "unknown" token.

A tokenizer.json may come with side files next to it, as Hugging Face checkpoints ship them:
``tokenizer_config.json`` (the chat template, the special tokens' names, ``add_bos_token``),
``chat_template.jinja`` (newer transformers keep the template there) and
``generation_config.json`` (every end-of-sequence id). They are read on load, kept byte for
byte, and written wherever the tokenizer is saved, so a model directory, an import and a
compressed artifact all carry them. A tokenizer this project trains gets a
tokenizer_config.json holding the default chat template (see chat_template.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastserve_ray.errors import TokenizerError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
# Names other tokenizers (Llama, GPT-2, Qwen) use for the same roles, tried in order.
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
_PAD_NAMES = (PAD, "<pad>", "<|finetune_right_pad_id|>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SIDE_FILES = (TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """A loaded tokenizer.json plus the ids of its bos/eos/pad tokens (None when absent)."""

    def __init__(self, hf: HFTokenizer, path: Path | None = None,
                 side_files: Mapping[str, bytes] | None = None) -> None:
        self.hf = hf
        # Text that happens to spell "<|eos|>" is encoded as plain text, never as the
        # control token: keeps encode→decode lossless and prompts unable to forge EOS.
        self.hf.encode_special_tokens = True
        self._token_bytes: dict[int, bytes] = {}
        self._with_specials: HFTokenizer | None = None  # a twin that parses special tokens
        self.path = path
        self.side_files = dict(side_files or {})  # file name -> bytes, see the module docstring
        where = str(path.parent) if path is not None else "tokenizer"
        self.config = _json_side_file(self.side_files, TOKENIZER_CONFIG_FILE, where)
        self.generation_config = _json_side_file(self.side_files, GENERATION_CONFIG_FILE, where)
        # tokenizer_config.json names the roles where it is there (Qwen2's EOS is <|im_end|>,
        # though the vocabulary also has <|endoftext|>; its bos_token is null: no BOS);
        # otherwise the usual names, in order.
        self.bos_id = self._configured_id("bos_token", _BOS_NAMES)
        self.eos_id = self._configured_id("eos_token", _EOS_NAMES)
        self.pad_id = self._configured_id("pad_token", _PAD_NAMES)
        self.eos_ids = self._all_eos_ids()
        # encode(add_bos=True) prepends BOS unless the checkpoint says add_bos_token: false.
        adds = self.config.get("add_bos_token")
        self.adds_bos = adds if isinstance(adds, bool) else True

    def _configured_id(self, key: str, fallback_names: Sequence[str]) -> int | None:
        if key not in self.config:
            return self._find(fallback_names)
        name = _token_name(self.config[key])  # an explicit null: the checkpoint has none
        return None if name is None else self.hf.token_to_id(name)

    def _all_eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence: the EOS token and generation_config's eos_token_id(s)."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        gen = self.generation_config.get("eos_token_id")
        for tid in gen if isinstance(gen, list) else [gen]:
            if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < self.vocab_size:
                ids.add(tid)
        return tuple(sorted(ids))

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (chat_template.jinja first, as transformers reads it)."""
        if CHAT_TEMPLATE_FILE in self.side_files:
            return self.side_files[CHAT_TEMPLATE_FILE].decode("utf-8", errors="replace")
        tpl = self.config.get("chat_template")
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default", next(iter(named.values()), None))
        return tpl if isinstance(tpl, str) else None

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special tokens' strings a chat template sees (bos_token, eos_token, ...)."""
        out = {}
        for key, tid in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if tid is not None:
                out[key] = self.hf.id_to_token(tid)
        for key in _SPECIAL_TOKEN_KEYS:
            name = _token_name(self.config.get(key))
            if name is not None:
                out[key] = name
        return out

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Token ids for text in which special-token strings are the special tokens.

        For a rendered chat template only, whose markup (``<|im_start|>``, the EOS closing a
        turn) must be the control tokens, as transformers tokenizes it; never for raw prompts.
        """
        if self._with_specials is None:
            twin = HFTokenizer.from_str(self.hf.to_str())
            twin.encode_special_tokens = False
            self._with_specials = twin
        return self._with_specials.encode(text, add_special_tokens=False).ids

    def write_side_files(self, directory: str | Path) -> None:
        """Write the side files into ``directory`` (next to a tokenizer.json there)."""
        for name, data in sorted(self.side_files.items()):
            (Path(directory) / name).write_bytes(data)

    def _find(self, names: Sequence[str]) -> int | None:
        for name in names:
            tid = self.hf.token_to_id(name)
            if tid is not None:
                return tid
        return None

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json (ours or any Hugging Face one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"tokenizer file {path} is not a valid tokenizer.json: {e}") from None
        side = {name: (path.parent / name).read_bytes() for name in SIDE_FILES
                if (path.parent / name).is_file()}
        return cls(hf, path, side)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to ``path`` (a file, or a directory to put it in), side files beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.hf.save(str(path))
        self.write_side_files(path.parent)
        return path

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids for ``text``; special-token strings in the text stay plain text.

        ``add_bos``: BOS first, where the tokenizer has one and its config does not say no.
        """
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.adds_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids for many texts at once (parallel in the Rust core)."""
        # encode_batch_fast skips the character offsets we never use: same ids, ~2x faster.
        encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; partial UTF-8 sequences decode to U+FFFD."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a piece of a multi-byte character, say).

        Byte-level BPE (GPT-2, Llama-3, Qwen2, ours) spells bytes as printable characters;
        SentencePiece-style vocabularies use ``<0xNN>`` byte-fallback tokens and ``▁`` for a
        space. Added and special tokens are their text. Cached per id.
        """
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.hf.id_to_token(token_id)
        if piece is None:
            out = b""
        elif token_id in self._added_ids:
            out = piece.encode("utf-8")
        elif self._byte_level:
            out = bytes(_BYTE_DECODER.get(ch, 0) for ch in piece) if all(
                ch in _BYTE_DECODER for ch in piece) else piece.encode("utf-8")
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out = bytes([int(piece[3:5], 16)])
        else:
            out = piece.replace("\u2581", " ").encode("utf-8")
        self._token_bytes[token_id] = out
        return out

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a special (control) token, left out of decoded text."""
        return token_id in self._special_ids

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self.hf.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
        return "ByteLevel" in kinds

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self.hf.get_added_tokens_decoder())

    def sha256(self) -> str:
        """Hash of the tokenizer file when loaded from disk, else of its JSON form."""
        if self.path is not None and self.path.is_file():
            return file_sha256(self.path)
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte as a printable character (the alphabet of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer on a stream of texts (memory ~ unique words)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}"
            " (256 bytes + special tokens)"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_nonempty(texts), trainer=trainer)
    return Tokenizer(hf, side_files={TOKENIZER_CONFIG_FILE: default_tokenizer_config()})


def default_tokenizer_config() -> bytes:
    """tokenizer_config.json for a tokenizer this project trains: special tokens, the default template."""
    from fastserve_ray.chat_template import DEFAULT_CHAT_TEMPLATE

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "chat_template": DEFAULT_CHAT_TEMPLATE}
    return (json.dumps(config, indent=2) + "\n").encode()


def _token_name(value: Any) -> str | None:
    """A special token's string from tokenizer_config.json ("<s>" or {"content": "<s>", ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json_side_file(side_files: Mapping[str, bytes], name: str, where: str) -> dict[str, Any]:
    if name not in side_files:
        return {}
    try:
        data = json.loads(side_files[name])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{where}/{name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{where}/{name} must hold a JSON object, got {type(data).__name__}")
    return data


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t
