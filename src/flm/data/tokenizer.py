"""One small tokenizer interface over HF `tokenizers` (trained here or loaded) and local tiktoken rank files.

Everything downstream only needs ids in, text out, the vocabulary size and the document separator, so the
two backends are hidden behind `Tokenizer`. Nothing here touches the network.
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from flm.errors import FlmError

EOT = "<|endoftext|>"
# Teacher-signal label tokens (REFERENCE.md §4): a proposition is `<text><label>`, the loss falls on the label only.
# They are special tokens appended after the vocabulary; encoding text never produces them (a document that spells
# "<|true|>" gets ordinary byte tokens), so only a labelled proposition can carry one.
TRUE_LABEL = "<|true|>"
FALSE_LABEL = "<|false|>"
LABELS = (TRUE_LABEL, FALSE_LABEL)
# Tokenizers from elsewhere name their document separator differently; the first one present is used.
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
# The cl100k_base pre-tokenisation regex: the rank files this loads were trained with it.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
HF_FILE = "tokenizer.json"
# Files of a Hugging Face tokenizer folder kept beside tokenizer.json and carried wherever the tokenizer goes
# (prepared data, checkpoints, exports): transformers' AutoTokenizer reads its class, special tokens and chat
# template from them. flm reads only the eos_token, as the document separator.
HF_EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json")
TIKTOKEN_FILE = "tokenizer.tiktoken"
TIKTOKEN_META = "tokenizer_tiktoken.json"


class Tokenizer:
    """Text <-> ids for one backend: an HF `tokenizers.Tokenizer` or a `tiktoken.Encoding`.

    `spec` says where it came from ("bpe", a tokenizer.json path or "tiktoken:PATH"); `vocab_size` counts every
    id it can emit, specials included, so it sizes the embedding. `hf_files`: the HF_EXTRA_FILES found beside a
    loaded tokenizer.json (name -> text), saved with it.
    """

    def __init__(self, backend: HFTokenizer | tiktoken.Encoding, spec: str, tiktoken_path: Path | None = None,
                 hf_files: dict[str, str] | None = None):
        self.spec = spec
        self._tiktoken_path = tiktoken_path
        self.hf_files = dict(hf_files or {})
        # Threads of tiktoken's batch encoding (its default); HF tokenizers follow TOKENIZERS_PARALLELISM instead.
        self.threads = 8
        self._use(backend)

    def _use(self, backend: HFTokenizer | tiktoken.Encoding) -> None:
        """Adopt `backend` and read the vocabulary size and the special ids off it."""
        self._backend = backend
        if isinstance(backend, HFTokenizer):
            # A document that happens to contain "<|endoftext|>" must not fake a document boundary.
            backend.encode_special_tokens = True
            vocab = backend.get_vocab(with_added_tokens=True)
            self.vocab_size = max(vocab.values()) + 1
            eot = next((vocab[t] for t in (*self._declared_eos(), *_EOT_CANDIDATES) if t in vocab), None)
            if eot is None:
                raise FlmError(f"tokenizer {self.spec} has no end-of-text token "
                               f"(looked for {', '.join(_EOT_CANDIDATES)})")
            self.eot_id = eot
            labels = [vocab.get(t) for t in LABELS]
        else:
            self.vocab_size = backend.n_vocab
            self.eot_id = backend.eot_token
            labels = [backend.encode_single_token(t) if t in backend.special_tokens_set else None for t in LABELS]
        # (TRUE id, FALSE id) once `add_label_tokens` ran (or the loaded tokenizer had them), else None.
        self.label_ids: tuple[int, int] | None = None if None in labels else (labels[0], labels[1])

    def declared_token(self, key: str) -> str | None:
        """The token a carried tokenizer_config.json names under `key` ("bos_token", "eos_token"), if any."""
        try:
            token = json.loads(self.hf_files.get(HF_EXTRA_FILES[0], "{}")).get(key)
        except (json.JSONDecodeError, AttributeError):
            return None
        token = token.get("content") if isinstance(token, dict) else token
        return token if isinstance(token, str) else None

    def token_id(self, token: str | None) -> int | None:
        """The id of special or ordinary token `token` (None if the vocabulary lacks it)."""
        if token is None:
            return None
        if isinstance(self._backend, HFTokenizer):
            return self._backend.token_to_id(token)
        try:
            return self._backend.encode_single_token(token)
        except KeyError:
            return None

    def _declared_eos(self) -> list[str]:
        """A carried tokenizer_config.json's eos_token (a Llama-family folder's own document end), if any."""
        eos = self.declared_token("eos_token")
        return [eos] if eos is not None else []

    def add_label_tokens(self) -> None:
        """Append the two teacher-signal label tokens (ids vocab_size and vocab_size + 1); no-op if present."""
        if self.label_ids is not None:
            return
        if isinstance(self._backend, HFTokenizer):
            self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LABELS])
            self._use(self._backend)
        else:
            assert self._tiktoken_path is not None
            self._use(_load_tiktoken(self._tiktoken_path, self.spec, labels=True)._backend)

    @property
    def name(self) -> str:
        return f"{self.spec} ({self.vocab_size} ids)"

    def encode(self, text: str) -> list[int]:
        if isinstance(self._backend, HFTokenizer):
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once: both backends parallelise across the batch. The HF backend skips computing
        character offsets (`encode_batch_fast`), which nothing here uses: 1.6x faster, the same ids."""
        if isinstance(self._backend, HFTokenizer):
            return [e.ids for e in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        return self._backend.encode_ordinary_batch(list(texts), num_threads=self.threads)

    @property
    def files(self) -> tuple[str, ...]:
        """The names `save` writes."""
        if isinstance(self._backend, HFTokenizer):
            return (HF_FILE, *sorted(self.hf_files))
        return (TIKTOKEN_FILE, TIKTOKEN_META)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if isinstance(self._backend, HFTokenizer):
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids)

    def save(self, directory: str | Path) -> None:
        """Write what `load_tokenizer_dir` needs; a tiktoken rank file is copied so the folder is self-contained."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self._backend, HFTokenizer):
            (directory / TIKTOKEN_META).unlink(missing_ok=True)  # it would take precedence when reloading
            self._backend.save(str(directory / HF_FILE))
            for name, text in self.hf_files.items():
                (directory / name).write_text(text, encoding="utf-8")
            return
        assert self._tiktoken_path is not None
        if self._tiktoken_path.resolve() != (directory / TIKTOKEN_FILE).resolve():
            shutil.copyfile(self._tiktoken_path, directory / TIKTOKEN_FILE)
        meta = {"ranks": TIKTOKEN_FILE, "spec": self.spec, "labels": self.label_ids is not None}
        (directory / TIKTOKEN_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE: every byte is in the base alphabet and nothing is normalised, so any string
    (whitespace runs, CJK, emoji) round-trips exactly through encode/decode."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, spec="bpe")


def load_tokenizer(spec: str) -> Tokenizer:
    """`spec` is a tokenizer.json path (or a folder holding one) or "tiktoken:PATH" to a local rank file. The
    HF_EXTRA_FILES beside a tokenizer.json (a Hugging Face model folder's) come with it."""
    if spec.startswith("tiktoken:"):
        return _load_tiktoken(Path(spec.removeprefix("tiktoken:")), spec)
    path = Path(spec)
    if path.is_dir():
        path = path / HF_FILE
    if not path.is_file():
        raise FlmError(f"tokenizer file not found: {path}")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise FlmError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from e
    extra = {}
    for name in HF_EXTRA_FILES:
        if (path.parent / name).is_file():
            try:
                extra[name] = (path.parent / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise FlmError(f"cannot read {path.parent / name}: {e}") from None
    return Tokenizer(backend, spec=spec, hf_files=extra)


def load_tokenizer_dir(directory: str | Path) -> Tokenizer:
    """Reload the tokenizer that `Tokenizer.save` wrote into `directory`."""
    directory = Path(directory)
    meta_path = directory / TIKTOKEN_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return _load_tiktoken(directory / meta["ranks"], meta["spec"], labels=bool(meta.get("labels", False)))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FlmError(f"corrupt tokenizer description {meta_path}: {e}") from e
    if (directory / HF_FILE).is_file():
        return load_tokenizer(str(directory / HF_FILE))
    raise FlmError(f"no tokenizer in {directory} (expected {HF_FILE} or {TIKTOKEN_META})")


def _load_tiktoken(path: Path, spec: str, labels: bool = False) -> Tokenizer:
    """Build a cl100k-style encoding from a local rank file, `<|endoftext|>` taking the first id after the ranks
    (and with `labels`, the two label tokens the next two).

    The file is parsed here rather than with `tiktoken.load.load_tiktoken_bpe`, which caches local files in a
    temp folder keyed by path and would silently serve stale ranks after the file changes.
    """
    ranks = read_ranks(path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise FlmError(f"tiktoken rank file {path} lacks {len(missing)} single-byte tokens, "
                       "so it cannot encode all text")
    if len(set(ranks.values())) != len(ranks):
        raise FlmError(f"tiktoken rank file {path} gives the same rank to two tokens")
    eot = max(ranks.values()) + 1
    specials = {EOT: eot} | ({label: eot + 1 + i for i, label in enumerate(LABELS)} if labels else {})
    enc = tiktoken.Encoding(path.stem, pat_str=CL100K_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, spec=spec, tiktoken_path=path)


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse "base64-token rank" lines."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FlmError(f"cannot read tiktoken rank file {path}: {e.strerror or e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise FlmError(f"{path}:{lineno}: not a tiktoken rank line (expected 'BASE64TOKEN RANK')") from e
    if not ranks:
        raise FlmError(f"tiktoken rank file {path} is empty")
    return ranks
