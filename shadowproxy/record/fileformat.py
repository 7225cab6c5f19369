"""The recording file format: zstd frames of length-prefixed, CRC-checked JSON records.

A file is a sequence of zstd frames, one per batch the writer flushed. Decompressed, a frame is a
sequence of records, each `length` (4 bytes, little-endian) `crc32` (4 bytes, little-endian, over the
payload) `payload` (`length` bytes of UTF-8 JSON, one object). The first record of every file is a
header, `{"format": "shadowproxy-recording", "version": 1, ...}`. A crash can leave the last frame
cut short: a frame that does not decompress to its end, or a record whose length or CRC does not
hold, ends the file (everything before it is read). docs/recording.md shows a reader in a few lines.
"""

from __future__ import annotations

import base64
import os
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import zstandard

__all__ = ["FORMAT", "SUFFIX", "VERSION", "decode_body", "encode_body", "frame", "read_file", "read_paths",
           "recording_files"]

FORMAT = "shadowproxy-recording"
VERSION = 1
SUFFIX = ".rec.zst"
_HEAD = struct.Struct("<II")


def encode_body(body: bytes, into: dict[str, Any]) -> None:
    """A body as `body` (UTF-8 text) or `body_b64` (anything else)."""
    try:
        into["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        into["body_b64"] = base64.b64encode(body).decode("ascii")


def decode_body(part: dict[str, Any]) -> bytes | None:
    if "body" in part:
        return str(part["body"]).encode("utf-8")
    if "body_b64" in part:
        return base64.b64decode(part["body_b64"])
    return None


def frame(records: list[dict[str, Any]], compressor: zstandard.ZstdCompressor) -> bytes:
    """One compressed frame holding `records`."""
    parts: list[bytes] = []
    for record in records:
        payload = orjson.dumps(record)
        parts.append(_HEAD.pack(len(payload), zlib.crc32(payload)))
        parts.append(payload)
    return compressor.compress(b"".join(parts))


def read_file(path: str | os.PathLike[str], torn: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every whole record in the file, header first; a torn tail is skipped (and noted in `torn`)."""
    with open(path, "rb") as file:
        data = file.read()
    while data:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        try:
            out = decompressor.decompress(data)
        except zstandard.ZstdError as exc:
            _note(torn, path, f"a damaged frame ({exc})")
            return
        complete = decompressor.eof
        data = decompressor.unused_data if complete else b""
        offset = 0
        while offset < len(out):
            if offset + _HEAD.size > len(out):
                _note(torn, path, "a record is cut short")
                return
            length, crc = _HEAD.unpack_from(out, offset)
            payload = out[offset + _HEAD.size : offset + _HEAD.size + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                _note(torn, path, "a record is cut short" if len(payload) != length else "a record fails its CRC")
                return
            offset += _HEAD.size + length
            yield orjson.loads(payload)
        if not complete:
            # A frame cut short by a crash: the records its whole blocks held are read above.
            _note(torn, path, "the last frame is cut short")
            return


def _note(torn: list[str] | None, path: str | os.PathLike[str], reason: str) -> None:
    if torn is not None:
        torn.append(f"{os.fspath(path)}: {reason}")


def recording_files(paths: list[str]) -> list[str]:
    """Files named, and the recordings inside directories named, oldest first within each."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith(SUFFIX))
            found.extend(os.path.join(path, n) for n in names)
        else:
            found.append(path)
    return found


def read_paths(paths: list[str], torn: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The exchange records in `paths` (files or directories), each with its candidate's outcome
    (a later `pair` record) joined in when it was mirrored, in time order within each file."""
    for path in recording_files(paths):
        pending: dict[str, dict[str, Any]] = {}
        order: list[dict[str, Any]] = []
        for record in read_file(path, torn):
            kind = record.get("type")
            if kind == "exchange":
                pending[str(record.get("id"))] = record
                order.append(record)
            elif kind == "pair":
                exchange = pending.get(str(record.get("id")))
                if exchange is not None:
                    exchange["candidate"] = record.get("candidate")
        yield from order
