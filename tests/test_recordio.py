"""RecordIO reader and WebFace12M extractor, against .rec/.idx files written here."""
from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_script

from transfira.errors import TransfiraError
from transfira.recordio import RecordFile, extract_all, extract_subsets, read_payload

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "WebFace12M" / "extract.py"
extract_script = load_script("data/WebFace12M/extract.py")

M = b"\x0a\x23\xd7\xce"  # 0xced7230a little-endian


def pack(label, image: bytes, id_: int = 0) -> bytes:
    """mx.recordio.pack: a scalar label goes in the header, a list after it (flag = count)."""
    if np.ndim(label) == 0:
        return struct.pack("<IfQQ", 0, float(label), id_, 0) + image
    arr = np.asarray(label, "<f4")
    return struct.pack("<IfQQ", arr.size, 0.0, id_, 0) + arr.tobytes() + image


def write_rec(folder: Path, payloads: dict[int, bytes]) -> dict[int, int]:
    """dmlc RecordIOWriter: split at every 4-aligned magic (dropping it), pad parts to 4 bytes."""
    out, offsets = bytearray(), {}
    for key, data in payloads.items():
        offsets[key] = len(out)
        cuts = [i for i in range(0, len(data) - 3, 4) if data[i:i + 4] == M]
        starts, ends = [0] + [c + 4 for c in cuts], cuts + [len(data)]
        n = len(starts)
        for j, (a, b) in enumerate(zip(starts, ends)):
            flag = 0 if n == 1 else 1 if j == 0 else 3 if j == n - 1 else 2
            out += M + struct.pack("<I", flag << 29 | (b - a)) + data[a:b] + bytes(-(b - a) % 4)
    (folder / "train.rec").write_bytes(bytes(out))
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    return offsets


@pytest.fixture
def ds(tmp_path):
    """InsightFace layout: meta record 0, images 1..N, then one record per identity."""
    rng = random.Random(0)
    images = {}  # key -> (subject, bytes)
    for key in range(1, 41):
        img = bytes(rng.randrange(256) for _ in range(rng.randrange(5, 300)))
        images[key] = ((key - 1) // 4, img)
    images[5] = (1, b"\xff\xd8" + b"ab" + M + b"xyzw" + M + b"tail!")  # two aligned magics -> 3 parts
    images[6] = (1, b"\xff\xd8" + b"a" + M + b"odd")  # unaligned magic: not split
    images[7] = (1, b"\xff\xd8\x00\x00" + M)  # magic at the very end: empty last part
    n_img = len(images) + 1
    subjects = sorted({s for s, _ in images.values()})
    payloads = {0: pack([n_img, n_img + len(subjects)], b"")}
    for key, (subject, img) in images.items():
        label = [subject, 7.5] if key % 3 == 0 else subject  # some multi-label headers
        payloads[key] = pack(label, img, id_=key)
    for j, s in enumerate(subjects):
        keys = [k for k, (t, _) in images.items() if t == s]
        payloads[n_img + j] = pack([min(keys), max(keys) + 1], b"")
    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    offsets = write_rec(rec_dir, payloads)
    return rec_dir, images, offsets


def subset_csv(path: Path, images: dict, keys) -> Path:
    pd.DataFrame({"path": [f"{images[k][0]:06d}/{k:08d}.jpg" for k in keys],
                  "subject_id": [images[k][0] for k in keys]}).to_csv(path, index=False)
    return path


def test_reader(ds):
    rec_dir, images, offsets = ds
    # key 5 split in 3 parts, key 7 in 2; the unaligned magic of key 6 stays inside its payload
    assert (rec_dir / "train.rec").read_bytes().count(M) == len(offsets) + 3 + 1
    rec = RecordFile(rec_dir)
    assert rec.meta.image_keys == range(1, 41) and rec.meta.identity_keys == range(41, 51)
    assert rec.image_keys().tolist() == list(range(1, 41))
    for key, (subject, img) in images.items():
        r = rec.read(key)
        assert (r.image, r.subject, r.id) == (img, subject, key)
        assert r.flag == (2 if key % 3 == 0 else 0)
    assert rec.read(3).label.tolist() == [0.0, 7.5]
    assert rec.read(41).label.tolist() == [1, 5]  # identity record: image key range


def test_extract_subsets_and_restart(ds, tmp_path):
    rec_dir, images, _ = ds
    train = subset_csv(tmp_path / "train.csv", images, range(1, 30))
    val = subset_csv(tmp_path / "val.csv", images, [5, 6, 7, 35, 36])  # 5-7 also in train
    out = tmp_path / "out"
    s = extract_subsets(rec_dir, [train, val], out, workers=3, progress=False)
    assert (s.written, s.skipped, s.missing, s.mismatched) == (31, 0, [], [])
    wanted = list(range(1, 30)) + [35, 36]
    for k in wanted:
        assert (out / f"{images[k][0]:06d}/{k:08d}.jpg").read_bytes() == images[k][1]
    assert len(list(out.rglob("*"))) == len(wanted) + len({images[k][0] for k in wanted})  # no temp files
    s = extract_subsets(rec_dir, [train, val], out, workers=2, progress=False)
    assert (s.written, s.skipped) == (0, 31)
    (out / f"{images[9][0]:06d}/{9:08d}.jpg").unlink()  # an interrupted run
    s = extract_subsets(rec_dir, [train, val], out, workers=2, progress=False)
    assert (s.written, s.skipped) == (1, 30)


def test_all_mode(ds, tmp_path):
    rec_dir, images, _ = ds
    out, csv = tmp_path / "all", tmp_path / "all.csv"
    s = extract_all(rec_dir, out, csv, workers=2, progress=False)
    assert (s.written, s.skipped, s.not_images) == (40, 0, 0)  # meta and identity records left out
    df = pd.read_csv(csv, dtype={"path": str})
    assert df["path"].tolist() == [f"{images[k][0]:06d}/{k:08d}.jpg" for k in range(1, 41)]
    assert df["subject_id"].tolist() == [images[k][0] for k in range(1, 41)]
    assert all((out / p).read_bytes() == images[k][1] for k, p in zip(range(1, 41), df["path"]))
    (out / df["path"][0]).unlink()
    (out / "000001" / "00000009.jpg.tmp-123").write_bytes(b"partial")  # killed mid-write: ignored
    s = extract_all(rec_dir, out, csv, workers=2, progress=False)
    assert (s.written, s.skipped) == (1, 39)
    assert pd.read_csv(csv, dtype={"path": str}).equals(df)


def test_all_mode_without_meta(tmp_path):
    write_rec(tmp_path, {10: pack(3, b"img10"), 11: pack([4, 1], b"img11"), 12: pack(5, b"")})
    s = extract_all(tmp_path, tmp_path / "o", tmp_path / "o.csv", workers=1, progress=False)
    assert (s.written, s.not_images) == (2, 1)
    assert (tmp_path / "o/000004/00000011.jpg").read_bytes() == b"img11"


def error(fn, *args, **kw) -> str:
    with pytest.raises(TransfiraError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_record_errors(ds, tmp_path):
    rec_dir, images, offsets = ds
    idx = rec_dir / "train.idx"
    idx.write_text(idx.read_text().replace(f"\n12\t{offsets[12]}\n", f"\n12\t{offsets[12] + 4}\n"))
    msg = error(RecordFile(rec_dir).read, 12)
    assert "record 12" in msg and f"byte {offsets[12] + 4}" in msg and "magic" in msg and "train.rec" in msg
    msg = error(RecordFile(rec_dir).read, 999)
    assert "record 999" in msg and "train.idx" in msg
    rec = rec_dir / "train.rec"
    rec.write_bytes(rec.read_bytes()[:offsets[20] + 10])
    msg = error(RecordFile(rec_dir).read, 20)
    assert "record 20" in msg and f"byte {offsets[20]}" in msg and "truncated" in msg
    csv = subset_csv(tmp_path / "t.csv", images, [19, 20])
    msg = error(extract_subsets, rec_dir, [csv], tmp_path / "out", workers=2, progress=False)
    assert "record 20" in msg and "truncated" in msg
    with open(rec, "rb") as f:
        assert "truncated" in error(read_payload, f, len(rec.read_bytes()) - 4, 1, rec)


def test_file_and_csv_errors(ds, tmp_path):
    rec_dir, images, _ = ds
    assert "not found" in error(RecordFile, tmp_path)
    (tmp_path / "train.rec").write_bytes(b"")
    assert "train.idx" in error(RecordFile, tmp_path)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"path": ["000001/00000005.jpg"], "label": [1]}).to_csv(bad, index=False)
    msg = error(extract_subsets, rec_dir, [bad], tmp_path / "o")
    assert "'subject_id'" in msg and "path, label" in msg
    pd.DataFrame({"path": ["000000/00000001.jpg", "000001/img.jpg"], "subject_id": [0, 1]}).to_csv(bad, index=False)
    assert "row 3" in error(extract_subsets, rec_dir, [bad], tmp_path / "o")
    pd.DataFrame({"path": ["000000/00000001.jpg", "000001/00000005.jpg"], "subject_id": [0, 2]}).to_csv(bad, index=False)
    assert "row 3" in error(extract_subsets, rec_dir, [bad], tmp_path / "o")


def test_script_label_mismatch_and_missing(ds, tmp_path, capsys):
    rec_dir, images, _ = ds
    csv = tmp_path / "t.csv"
    pd.DataFrame({"path": ["000000/00000001.jpg", "000009/00000002.jpg"], "subject_id": [0, 9]}).to_csv(csv, index=False)
    args = ["--rec_dir", str(rec_dir), "--csv", str(csv), "--out", str(tmp_path / "o"), "--no_progress"]
    assert "(2, 9, 0)" in error(extract_script.main, args)
    assert not (tmp_path / "o/000009").exists() and (tmp_path / "o/000000/00000001.jpg").exists()
    extract_script.main(args + ["--allow_mismatch"])
    assert (tmp_path / "o/000009/00000002.jpg").read_bytes() == images[2][1]
    pd.DataFrame({"path": ["000000/00000001.jpg", "000000/00000777.jpg"], "subject_id": [0, 0]}).to_csv(csv, index=False)
    assert "[777]" in error(extract_script.main, args)
    assert "missing 1" in capsys.readouterr().out


def test_script_subprocess(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--rec_dir", str(tmp_path), "--all", "--no_progress"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: record file not found")
