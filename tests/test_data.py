"""Folder scan, caption reading and bucket choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltxv_tuner.data import CaptionError, choose_bucket, final_caption, read_caption, scan_folder


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "raw, text, note",
    [
        (b"a red ball\n", "a red ball", None),
        (b"\xef\xbb\xbfa red ball\r\n", "a red ball", None),  # BOM + CRLF
        (b"  \n a red ball \t\n\n", "a red ball", None),
        (b"a red ball\r\nbouncing high\r\n", "a red ball bouncing high", "caption has 2 lines, joined with spaces"),
        ("un caf\u00e9 \u2014 \u65e5\u672c".encode(), "un caf\u00e9 \u2014 \u65e5\u672c", None),
    ],
)
def test_read_caption(tmp_path: Path, raw: bytes, text: str, note):
    assert read_caption(touch(tmp_path / "c.txt", raw)) == (text, note)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"", "caption file is empty"),
        (b" \r\n\t\n", "caption file is empty"),
        (b"caf\xe9", "not UTF-8.*0xe9 at offset 3"),
    ],
)
def test_unusable_captions(tmp_path: Path, raw: bytes, match: str):
    with pytest.raises(CaptionError, match=match):
        read_caption(touch(tmp_path / "c.txt", raw))


def test_final_caption():
    assert final_caption("a ball", "SQUISH") == "SQUISH a ball"
    assert final_caption("a ball", None) == final_caption("a ball", " ") == "a ball"


def test_scan_pairs_and_reports(tmp_path: Path):
    for name in ["a.mp4", "a.txt", "b.MOV", "b.txt", "sub/c.webm", "sub/c.txt", "d.mkv", "e.txt", "f.mp4", "f.mov"]:
        touch(tmp_path / name)
    touch(tmp_path / "f.txt")
    touch(tmp_path / "._a.mp4")  # macOS resource fork: hidden, ignored
    touch(tmp_path / ".precomputed" / "x.mp4")
    touch(tmp_path / "notes.md")
    scan = scan_folder(tmp_path)
    assert [c.rel for c in scan.clips] == ["a.mp4", "b.MOV", "sub/c.webm"]
    assert scan.clips[1].caption == tmp_path / "b.txt"
    skipped = {i.path: i.reason for i in scan.skipped}
    assert skipped["d.mkv"] == "no caption file d.txt beside it"
    assert "ambiguous: f.mov and f.mp4 would share the caption f.txt" in skipped["f.mp4"]
    assert skipped["f.mov"] == skipped["f.mp4"]
    assert [(i.path, i.reason) for i in scan.notes] == [("e.txt", "caption without a video (orphan), ignored")]
    assert len(scan.files) == 11  # videos and captions only


BUCKETS = [[128, 96, 17], [96, 128, 17], [128, 96, 33], [128, 128, 9]]


@pytest.mark.parametrize(
    "w, h, f, bucket",
    [
        (160, 120, 40, [128, 96, 33]),  # landscape: closest ratio, then most frames
        (160, 120, 20, [128, 96, 17]),  # too short for 33
        (120, 160, 40, [96, 128, 17]),  # portrait
        (100, 100, 40, [128, 128, 9]),  # square wins over more frames at the wrong ratio
        (100, 100, 12, [128, 128, 9]),
        (1920, 1080, 12, [128, 128, 9]),  # only the 9-frame bucket is fillable
    ],
)
def test_choose_bucket(w, h, f, bucket):
    assert choose_bucket(w, h, f, BUCKETS) == (bucket, None)


def test_too_short_for_every_bucket():
    assert choose_bucket(128, 96, 8, BUCKETS) == (None, "too short: 8 frames, the shortest bucket needs 9")
