"""Reading a corpus: each rank's share of the text, in chunks of lines, as Apache Arrow strings.

A corpus is a text file, a compressed text file (gzip, bzip2 or xz, recognised by their magic
bytes, read with Python's own modules as gensim's ``smart_open`` does) or a folder of such files
(regular files in name order, hidden files skipped, no recursion). A line is a sentence; tokens
are separated by Unicode whitespace (what ``str.split()`` and gensim's ``LineSentence`` do).

Each rank reads its share and nothing else:

- a plain file: the lines whose first byte lies in the rank's ``1/world`` byte range of it;
- a compressed file, which cannot be entered in the middle: every rank decompresses the stream
  and keeps the chunks ``k`` with ``(k + file index) % world == rank``.

Text comes in chunks of about `CHUNK_BYTES`, cut at line ends, so memory is bounded by the
chunk whatever the corpus size. A corpus of very long lines (text8 is one line of 100 MB) is cut
at a space or tab instead where no line ends nearby (`LONG_LINE` bytes when a rank's share starts, a
chunk's length when a chunk ends): each piece is a sentence of its own, and every rank gets its
share (the whole of text8 went to rank 0). Bytes are decoded with ``encoding`` (UTF-8 by default, validated
by Arrow without a Python string); bytes that do not decode stop the rank with a `CorpusError`
naming the file, the line and the option to set, unless ``errors`` says to replace or ignore them.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["CHUNK_BYTES", "CorpusError", "CorpusSpec", "Chunk", "read_chunks", "tokenize"]

CHUNK_BYTES = 64 << 20
LONG_LINE = 1 << 20  # a rank's share starts at a space or tab when no line starts within this many bytes
_BLOCK = 1 << 20  # read size when looking for a line end
_BOM = b"\xef\xbb\xbf"
_OPENERS = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
_MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
          (b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"), (b"7z\xbc\xaf\x27\x1c", "7z")]


class CorpusError(ValueError):
    """The corpus cannot be read as configured (missing, unsupported, undecodable)."""


def _compression(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            if name not in _OPENERS:
                raise CorpusError(f"{path} is a {name} archive: decompress it first (gzip, bzip2 and xz files "
                                  "are read directly)")
            return name
    return None


@dataclass(frozen=True)
class CorpusSpec:
    """What to read and how: the files in reading order, their compression, the decoding."""

    paths: tuple[str, ...]
    compressions: tuple[str | None, ...]
    encoding: str = "utf-8"
    errors: str = "strict"
    lowercase: bool = False

    @classmethod
    def resolve(cls, path: str, encoding: str = "utf-8", errors: str = "strict",
                lowercase: bool = False) -> CorpusSpec:
        """Check ``path`` and the decoding options; CorpusError says what is wrong."""
        try:
            info = codecs.lookup(encoding)
        except LookupError:
            raise CorpusError(f"data.encoding={encoding!r} is not an encoding Python knows") from None
        if "\n ".encode(info.name, errors="strict") != b"\n ":
            raise CorpusError(f"data.encoding={encoding!r} is not ASCII-compatible (newlines and spaces must be "
                              "single bytes): convert the corpus to UTF-8 first")
        if errors not in ("strict", "replace", "ignore"):
            raise CorpusError(f"data.decode_errors={errors!r} must be 'strict', 'replace' or 'ignore'")
        p = Path(path)
        if p.is_dir():
            files = sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise CorpusError(f"data.path: the folder {path} holds no files")
        elif p.is_file():
            files = [str(p)]
        elif p.exists():
            raise CorpusError(f"data.path: {path} is neither a regular file nor a folder (a device, a pipe?)")
        else:
            raise CorpusError(f"data.path: corpus file {path} does not exist")
        return cls(tuple(files), tuple(_compression(f) for f in files), info.name, errors, lowercase)

    def identity(self) -> list:
        """What decides the text (files, sizes, modification times, decoding), for caches."""
        files = [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in self.paths]
        return [files, self.encoding, self.errors, self.lowercase]

    def share_bytes(self, rank: int, world: int) -> int:
        """About how many bytes this rank reads (for progress bars)."""
        total = 0
        for path, compression in zip(self.paths, self.compressions):
            size = os.path.getsize(path)
            total += size if compression else size * (rank + 1) // world - size * rank // world
        return total


@dataclass
class Chunk:
    """Whole lines of one file: ``lines`` (Arrow large_string, one sentence each, lowercased if
    asked) and the raw bytes they took (``nbytes``, for progress)."""

    lines: pa.Array
    nbytes: int


def read_chunks(spec: CorpusSpec, rank: int, world: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """This rank's share of the corpus as chunks of whole lines (see the module docstring)."""
    for index, (path, compression) in enumerate(zip(spec.paths, spec.compressions)):
        if compression is None:
            blocks = _plain_share(path, rank, world, chunk_bytes, skip_bom=spec.encoding == "utf-8")
        else:
            blocks = _compressed_share(path, compression, (rank - index) % world, world, chunk_bytes)
        for offset, block in blocks:
            yield Chunk(_decode(block, spec, path, compression, offset), len(block))


# What str.split() splits on: every character whose str.isspace() is true (29 in Unicode 15).
_UNICODE_SPACES = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
                   "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_SPACE_RUN = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in _UNICODE_SPACES) + "]+"  # an RE2 class


def tokenize(lines: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Lines -> (their tokens in order, the line of each token): split on Unicode whitespace,
    as ``str.split()`` does (no empty tokens).

    Arrow's ``utf8_split_whitespace`` is not used: in pyarrow 26 it sometimes keeps a trailing
    multi-byte space as a token of the array's last line (nondeterministically; found by
    ``tests/test_corpus_pipeline.py``). ASCII chunks without the separators \\x1c-\\x1f (which
    ``str.split`` splits on and ``ascii_split_whitespace`` does not) take the fast ASCII split;
    the rest an RE2 split on the exact set of ``str.isspace`` characters."""
    ascii_only = pc.all(pc.string_is_ascii(lines)).as_py() is not False
    if ascii_only and not pc.any(pc.match_substring_regex(lines, "[\\x{1c}-\\x{1f}]")).as_py():
        split = pc.ascii_split_whitespace(lines)
    else:
        split = pc.split_pattern_regex(lines, _SPACE_RUN)
    tokens, line = pc.list_flatten(split), pc.list_parent_indices(split)
    nonempty = pc.greater(pc.binary_length(tokens), 0)
    return tokens.filter(nonempty), line.filter(nonempty)


# ---------------------------------------------------------------------------- reading bytes
def _first_blank(data: bytes) -> int:
    """The position of the first space or tab in ``data`` (-1: none)."""
    found = [i for i in (data.find(b" "), data.find(b"\t")) if i >= 0]
    return min(found) if found else -1


def _line_start(f, position: int, size: int) -> int:
    """The first line start at or after ``position``; inside a line longer than `LONG_LINE`
    bytes (measured from its start, or the file's, to its end, or the file's), the first word
    start at or after ``position``, when one comes before the line's end."""
    if position <= 0:
        return 0
    if position >= size:
        return size
    f.seek(position - 1)
    ahead = f.read(LONG_LINE + 1)  # bytes from position - 1 on
    found = ahead.find(b"\n")
    end = position + found if found >= 0 else (size if len(ahead) < LONG_LINE + 1 else None)  # the next line start
    back = max(0, position - 1 - LONG_LINE)
    f.seek(back)
    behind = f.read(position - 1 - back)  # bytes [back, position - 1)
    nl = behind.rfind(b"\n")
    begin = back + nl + 1 if nl >= 0 else (0 if back == 0 else None)  # this line's start, if within reach
    if end is not None and begin is not None and end - begin <= LONG_LINE:
        return end  # an ordinary line
    space = _first_blank(ahead)
    if space >= 0 and (end is None or position + space < end):
        return position + space
    if end is not None:
        return end
    at = position - 1 + len(ahead)  # a long line without a space in reach: its end
    f.seek(at)
    while True:
        block = f.read(_BLOCK)
        if not block:
            return size
        found = block.find(b"\n")
        if found >= 0:
            return at + found + 1
        at += len(block)


def _cut_lines(blocks, chunk_bytes: int):
    """Re-cut a stream of (offset, bytes) into pieces of about ``chunk_bytes`` that end at line
    ends (the last piece may lack its newline)."""
    carry, carry_at = b"", 0
    for offset, block in blocks:
        if not carry:
            carry_at = offset
        carry += block
        while len(carry) >= chunk_bytes:
            end = carry.rfind(b"\n", 0, len(carry)) + 1
            if end == 0 and len(carry) >= LONG_LINE:  # a long line: cut it after its last space or tab
                end = max(carry.rfind(b" "), carry.rfind(b"\t")) + 1
            if end == 0:  # one line longer than a chunk: wait for its end (or, past LONG_LINE, a space)
                break
            yield carry_at, carry[:end]
            carry, carry_at = carry[end:], carry_at + end
    if carry:
        yield carry_at, carry


def _plain_share(path: str, rank: int, world: int, chunk_bytes: int, skip_bom: bool):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = _line_start(f, size * rank // world, size)
        stop = _line_start(f, size * (rank + 1) // world, size)
        if start == 0 and skip_bom and f.seek(0) == 0 and f.read(3) == _BOM:
            start = 3

        def blocks():
            f.seek(start)
            at = start
            while at < stop:
                block = f.read(min(chunk_bytes, stop - at))
                if not block:
                    break
                yield at, block
                at += len(block)

        yield from _cut_lines(blocks(), chunk_bytes)


def _compressed_share(path: str, compression: str, first: int, world: int, chunk_bytes: int):
    with _OPENERS[compression](path, "rb") as f:
        def blocks():
            at = 0
            try:
                while block := f.read(chunk_bytes):
                    yield at, block
                    at += len(block)
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise CorpusError(f"{path}: the {compression} stream is damaged after {at} bytes ({e})") from e

        for k, (offset, piece) in enumerate(_cut_lines(blocks(), chunk_bytes)):
            if k % world == first:
                yield offset, piece


# ---------------------------------------------------------------------------- decoding
def _decode(block: bytes, spec: CorpusSpec, path: str, compression: str | None, offset: int) -> pa.Array:
    """Bytes of whole lines -> Arrow lines (the empty string after a final newline dropped).
    CorpusError for bytes that are not text: undecodable, or a NUL byte (which every encoding
    the corpus can be in, ASCII-compatible ones, decodes without complaint)."""
    nul = block.find(b"\x00")
    if nul >= 0:
        raise _decode_error(spec, path, compression, offset + nul, block[nul : nul + 4])
    if spec.encoding == "utf-8" and spec.errors == "strict":
        text = pa.Array.from_buffers(pa.large_string(), 1, [None, pa.py_buffer(_offsets(len(block))),
                                                            pa.py_buffer(block)])
        try:
            text.validate(full=True)  # UTF-8 check in Arrow; no Python string is made
        except pa.ArrowInvalid:
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(spec, path, compression, offset + e.start, block[e.start : e.start + 4]) from None
            raise
    else:
        try:
            text = pa.array([block.decode(spec.encoding, spec.errors)], pa.large_string())
        except UnicodeDecodeError as e:
            raise _decode_error(spec, path, compression, offset + e.start, block[e.start : e.start + 4]) from None
    lines = pc.split_pattern(text, "\n")[0].values
    if block.endswith(b"\n"):
        lines = lines.slice(0, len(lines) - 1)
    return pc.utf8_lower(lines) if spec.lowercase else lines


def _offsets(n: int) -> bytes:
    return (0).to_bytes(8, "little") + n.to_bytes(8, "little")


def _decode_error(spec: CorpusSpec, path: str, compression: str | None, offset: int, sample: bytes) -> CorpusError:
    line = _line_number(path, compression, offset)
    if sample.startswith(b"\x00") or b"\x00" in _head(path, compression):
        return CorpusError(f"{path} is not text (it holds NUL bytes, line {line} has bytes {sample!r}): "
                           "point data.path at a text corpus")
    return CorpusError(
        f"{path}, line {line}: bytes {sample!r} are not valid {spec.encoding} text. Set data.encoding to the "
        f"file's encoding (e.g. data.encoding=latin-1), or data.decode_errors=replace (or ignore) to "
        "replace (drop) undecodable bytes"
    )


def _head(path: str, compression: str | None, size: int = 1 << 16) -> bytes:
    opener = _OPENERS[compression] if compression else open
    with opener(path, "rb") as f:
        return f.read(size)


def _line_number(path: str, compression: str | None, offset: int) -> int:
    """1-based line holding byte ``offset`` of the (decompressed) stream."""
    opener = _OPENERS[compression] if compression else open
    newlines, at = 0, 0
    with opener(path, "rb") as f:
        while at < offset:
            block = f.read(min(_BLOCK, offset - at))
            if not block:
                break
            newlines += block.count(b"\n")
            at += len(block)
    return newlines + 1
