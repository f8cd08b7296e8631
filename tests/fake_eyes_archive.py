"""Small fake Eyes-defy-anemia archives for tests, reproducing the real archive's quirks.

Each patient gets a textured synthetic "eye photo" (portrait once EXIF orientation is applied) and elliptical
palpebral/forniceal regions known exactly in normalised coordinates, so a test can rasterise the true mask at any
resolution. Mask files are whole-frame cut-outs of the photo at a lower resolution in one of several encodings
(`ENCODINGS`), including deliberately broken ones. Spreadsheets are written with a tiny .xlsx writer (shared strings,
inline strings, numbers), since openpyxl is not a dependency.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import struct
import zipfile
import zlib
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

KINDS = ("palpebral", "forniceal", "forniceal_palpebral")
# Mask encodings: the archive's real ones, then broken ones the builder must report.
ENCODINGS = ("rgba", "white", "rgb_white", "rgba16", "rgb16_white", "palette", "full", "iccp_bad_crc",
             "iccp_bad_method", "iccp_bad_zlib", "rotated", "landscape", "scaled80", "scaled90", "garbage")
# Wrong-scale cut-outs: made from a centred crop of the photo (this fraction of each side, so the same aspect ratio)
# stretched to the whole frame.
SCALED = {"scaled80": 0.8, "scaled90": 0.9}
# Orientation tag -> transpose that turns the upright picture into the stored pixels (inverse of exif_transpose).
_TO_RAW = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@dataclasses.dataclass
class Patient:
    """One fake patient folder. ``masks`` maps kind -> (file name, encoding)."""

    country: str
    number: int
    photo: str | None
    masks: dict[str, tuple[str, str]]
    orientation: int = 6
    extra: dict[str, bytes] = dataclasses.field(default_factory=dict)
    broken_photo: bool = False
    copies: dict[str, str] = dataclasses.field(default_factory=dict)  # copy name -> name of the file it duplicates

    @property
    def patient_id(self) -> str:
        return f"{self.country}/{self.number}"


def regions(seed: int) -> dict[str, tuple[float, float, float, float]]:
    """Normalised ellipses (cx, cy, rx, ry) of the palpebral and forniceal regions of patient ``seed``."""
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.55, 0.65)
    # Centres 0.09 apart, less than the smallest sum of half-heights (0.14): the regions always overlap broadly, as
    # the real ones touch, with no thin neck a low-resolution mask cannot represent.
    return {"palpebral": (cx, cy + 0.05, rng.uniform(0.22, 0.3), rng.uniform(0.08, 0.11)),
            "forniceal": (cx, cy - 0.04, rng.uniform(0.18, 0.25), rng.uniform(0.06, 0.08))}


def true_mask(seed: int, kind: str, size: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """bool [h, w] of region ``kind`` at ``size`` = (w, h), sampled at pixel centres; ``scale`` < 1 gives the region
    within the centred crop of that fraction of each side, stretched to ``size``."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    x, y = 0.5 + scale * ((x + 0.5) / w - 0.5), 0.5 + scale * ((y + 0.5) / h - 0.5)
    inside = {}
    for name, (cx, cy, rx, ry) in regions(seed).items():
        inside[name] = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    if kind == "forniceal_palpebral":
        return inside["palpebral"] | inside["forniceal"]
    return inside[kind]


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """Upright textured photo (RGB, ``size`` = (w, h)): skin-toned noise, redder conjunctiva. No near-white pixels."""
    w, h = size
    rng = np.random.default_rng(seed + 1000)
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w, 3)), sigma=(1.2, 1.2, 0)) * 120
    base = np.array([170.0, 120.0, 100.0]) + noise
    conj = true_mask(seed, "forniceal_palpebral", size)
    base[conj] += np.array([40.0, -30.0, -20.0])
    return Image.fromarray(np.clip(base, 20, 225).astype(np.uint8))


def _chunk(ctype: bytes, payload: bytes, *, bad_crc: bool = False) -> bytes:
    crc = zlib.crc32(ctype + payload) ^ (0xFFFF if bad_crc else 0)
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", crc & 0xFFFFFFFF)


def png16(arr16: np.ndarray) -> bytes:
    """A 16-bit PNG (colour type 2 or 6 from 3 or 4 channels) — Pillow cannot write these."""
    h, w, c = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def insert_iccp(png: bytes, variant: str) -> bytes:
    """Inserts a broken iCCP chunk after IHDR: 'bad_crc' (good profile, wrong CRC), 'bad_method' (unknown
    compression method) or 'bad_zlib' (undecodable profile, correct CRC)."""
    profile = zlib.compress(b"fake icc profile" * 8)
    payload = {"bad_crc": b"Photoshop ICC\x00\x00" + profile, "bad_method": b"Photoshop ICC\x00\x01" + profile,
               "bad_zlib": b"Photoshop ICC\x00\x00" + b"definitely not zlib"}[variant]
    ihdr_end = 8 + 12 + 13
    return png[:ihdr_end] + _chunk(b"iCCP", payload, bad_crc=variant == "bad_crc") + png[ihdr_end:]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def cutout(seed: int, kind: str, encoding: str, photo_size: tuple[int, int], mask_size: tuple[int, int]) -> bytes:
    """The bytes of a mask file of ``kind`` in ``encoding`` (see `ENCODINGS`)."""
    if encoding == "garbage":
        return b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 5
    size = photo_size if encoding == "full" else mask_size
    upright = photo(seed, photo_size)
    if encoding == "landscape":  # cut from the stored (sideways) pixels: the photo's EXIF rotation not applied
        upright, size = upright.transpose(Image.Transpose.ROTATE_90), size[::-1]
    scale = SCALED.get(encoding, 1.0)
    pw, ph = photo_size
    crop = (pw * (1 - scale) / 2, ph * (1 - scale) / 2, pw * (1 + scale) / 2, ph * (1 + scale) / 2)
    rgb = np.asarray(upright.resize(size, Image.Resampling.BOX, box=None if scale == 1 else crop))
    region = true_mask(seed, kind, mask_size, scale)
    if encoding == "landscape":
        region = np.rot90(region)
    if encoding == "rotated":
        rgb = rgb[::-1, ::-1]
    if encoding == "full":
        region = true_mask(seed, kind, photo_size)
    alpha = np.where(region, 255, 0).astype(np.uint8)
    white = np.where(region[..., None], rgb, 255).astype(np.uint8)
    if encoding in ("rgba", "full", "rotated", "landscape", *SCALED) or encoding.startswith("iccp"):
        data = _png(Image.fromarray(np.dstack([rgb * region[..., None], alpha]).astype(np.uint8)))
        return insert_iccp(data, encoding[5:]) if encoding.startswith("iccp") else data
    if encoding == "white":
        return _png(Image.fromarray(np.dstack([white, np.full_like(alpha, 255)])))
    if encoding == "rgb_white":
        return _png(Image.fromarray(white))
    if encoding == "rgba16":
        return png16(np.dstack([rgb, alpha]).astype(np.uint16) * 257)
    if encoding == "rgb16_white":
        return png16(white.astype(np.uint16) * 257)
    if encoding == "palette":
        pal = Image.fromarray(white).quantize(colors=200)
        idx = np.asarray(pal).copy()
        idx[~region] = 255
        out = Image.frombytes("P", pal.size, idx.tobytes())
        palette = pal.getpalette()[: 200 * 3]
        out.putpalette(palette + [255] * (768 - len(palette)))  # a full 256-entry palette, so index 255 exists
        buf = io.BytesIO()
        out.save(buf, format="PNG", transparency=255)
        return buf.getvalue()
    raise ValueError(f"unknown encoding {encoding!r}")


def jpeg(seed: int, size: tuple[int, int], orientation: int) -> bytes:
    """The photo as the camera stores it: pixels sideways, EXIF orientation tag to turn them upright."""
    img = photo(seed, size)
    if _TO_RAW[orientation] is not None:
        img = img.transpose(_TO_RAW[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def xlsx(rows: Sequence[Sequence[object]], *, sheet: str = "Foglio1", inline: Sequence[str] = ()) -> bytes:
    """A minimal .xlsx: str cells as shared strings (as inline strings if listed in ``inline``), numbers numeric."""
    shared: list[str] = []
    xml_rows = []
    for r, row in enumerate(rows, start=1):
        cells = []
        for c, value in enumerate(row):
            ref = f"{chr(ord('A') + c)}{r}"
            if value is None:
                cells.append(f'<c r="{ref}" s="1"/>')  # styled empty cell, as Excel writes for blank columns
            elif isinstance(value, str) and value in inline:
                cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{value}</t></is></c>')
            elif isinstance(value, str):
                if value not in shared:
                    shared.append(value)
                cells.append(f'<c r="{ref}" t="s"><v>{shared.index(value)}</v></c>')
            else:
                cells.append(f'<c r="{ref}"><v>{value}</v></c>')
        xml_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel_ns = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    pkg = "http://schemas.openxmlformats.org/package/2006/relationships"
    office = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    parts = {
        "xl/workbook.xml": f'<workbook {ns} {rel_ns}><sheets><sheet name="Other" sheetId="1" r:id="rId9"/>'
                           f'<sheet name="{sheet}" sheetId="2" r:id="rId4"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels":
            f'<Relationships xmlns="{pkg}"><Relationship Id="rId4" Type="{office}/worksheet" '
            f'Target="worksheets/sheet1.xml"/><Relationship Id="rId9" Type="{office}/worksheet" '
            f'Target="/xl/worksheets/sheet2.xml"/><Relationship Id="rId3" Type="{office}/sharedStrings" '
            f'Target="sharedStrings.xml"/></Relationships>',
        "xl/sharedStrings.xml": f'<sst {ns}>' + "".join(f"<si><t>{s}</t></si>" for s in shared) + "</sst>",
        "xl/worksheets/sheet1.xml": f'<worksheet {ns}><sheetData>{"".join(xml_rows)}</sheetData></worksheet>',
        "xl/worksheets/sheet2.xml": f'<worksheet {ns}><sheetData><row r="1"><c r="A1"><v>0</v></c></row>'
                                    "</sheetData></worksheet>",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in parts.items():
            zf.writestr(name, text)
    return buf.getvalue()


def patient_files(p: Patient, seed: int, photo_size: tuple[int, int], mask_size: tuple[int, int]) -> dict[str, bytes]:
    """File name -> bytes for one patient folder."""
    files = dict(p.extra)
    if p.photo is not None:
        files[p.photo] = jpeg(seed, photo_size, p.orientation)
        if p.broken_photo:
            files[p.photo] = files[p.photo][: len(files[p.photo]) // 3]
    for kind, (name, encoding) in p.masks.items():
        files[name] = cutout(seed, kind, encoding, photo_size, mask_size)
    for copy, original in p.copies.items():
        files[copy] = files[original]
    return files


def seed_of(p: Patient) -> int:
    return (0 if p.country == "India" else 1000) + p.number


def write_archive(out: pathlib.Path, patients: Sequence[Patient], sheets: dict[str, bytes], *,
                  photo_size=(60, 80), mask_size=(30, 40), top: str = "dataset anemia") -> pathlib.Path:
    """Writes the archive as a zip (``out`` ends in .zip) or a folder; ``sheets`` maps archive-relative path (under
    ``top``) to .xlsx bytes. Patient folders go to ``<top>/<country>/<number>/``."""
    entries = {f"{top}/{rel}": data for rel, data in sheets.items()}
    for p in patients:
        for name, data in patient_files(p, seed_of(p), photo_size, mask_size).items():
            entries[f"{top}/{p.country}/{p.number}/{name}"] = data
    if out.suffix == ".zip":
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w") as zf:
            for rel, data in sorted(entries.items()):
                zf.writestr(rel, data)
    else:
        for rel, data in entries.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
    return out


def quirk_patients() -> list[Patient]:
    """Patients reproducing every quirk of the real archive, plus broken files the builder must report."""
    ds = {".DS_Store": b"\x00\x00\x00\x01Bud1" + b"\x00" * 20}
    t17, t35, t95, t100 = "T_1_20190606_092247", "T_4_20190606_095326", "T_64_20190612_092742", "T_69_20190613_0814"
    i1, i3, i5, i6, i7, i8, i9 = ("20200124_080100", "20200124_091841", "20200124_094523", "20200124_103722",
                                  "20200124_202058", "20200124_202947", "20200124_210412")
    std = lambda stem, enc: {k: (f"{stem}_{k}.png", enc.get(k, "rgba")) for k in KINDS}  # noqa: E731
    return [
        Patient("Italy", 1, "1.jpg", {"palpebral": ("001_palpebral.png", "white")}, extra=ds),
        Patient("Italy", 2, "2.jpg", std("002", {k: "white" for k in KINDS}), extra=ds),
        Patient("Italy", 4, "4.jpg", {"palpebral": ("004_palpebral.png", "white"),
                                      "forniceal": ("004__forniceal.png", "white"),
                                      "forniceal_palpebral": ("004__forniceal_palpebral.png", "white")}),
        Patient("Italy", 9, "9.jpg", std("009", {"palpebral": "rgb_white", "forniceal": "white"}), orientation=8),
        Patient("Italy", 17, f"{t17}.jpg", std(t17, {"palpebral": "iccp_bad_crc", "forniceal": "rgba16"}), extra=ds),
        Patient("Italy", 35, f"{t35}.jpg", {"palpebral": (f"{t35}_palpebral.png", "iccp_bad_method")}, orientation=1),
        Patient("Italy", 93, "T_62_20190612_091625.jpg",
                std("T_62_20190612_091625", {"forniceal_palpebral": "palette"}), orientation=3),
        Patient("Italy", 95, f"{t95}.jpg", {"palpebral": (f"{t95}_palplebral.png", "full"),
                                            "forniceal": (f"{t95}_forniceal.png", "rgba"),
                                            "forniceal_palpebral": (f"{t95}_forniceal_palplebral.png", "rgba")}),
        Patient("Italy", 100, f"{t100}.jpg", std(t100, {"palpebral": "rotated", "forniceal": "landscape"})),
        Patient("India", 1, f"{i1}.jpg", std(i1, {"forniceal": "iccp_bad_zlib"}), orientation=6, extra=ds),
        Patient("India", 3, f"{i3}.jpg", std(i3, {"forniceal": "garbage"}),
                extra={"notes.txt": b"stray file", **ds}),
        Patient("India", 5, f"{i5}.jpg", std(i5, {}), broken_photo=True),
        Patient("India", 6, None, std(i6, {})),
        Patient("India", 7, f"{i7}.jpg", {"palpebral": (f"{i7}_papebral.png", "rgb16_white"),
                                          "forniceal": (f"{i7}_forniceal.png", "rgba"),
                                          "forniceal_palpebral": (f"{i7}_forniceal_palpebral.png", "rgba")}),
        Patient("India", 8, f"{i8}.jpg", std(i8, {}), extra=ds,
                copies={f"{i8}_palpebral(1).png": f"{i8}_palpebral.png",
                        f"{i8}_forniceal_palpebral(1).png": f"{i8}_forniceal_palpebral.png"}),
        Patient("India", 9, f"{i9}.jpg", std(i9, {"palpebral": "scaled90", "forniceal": "scaled80"})),
    ]


def quirk_sheets() -> dict[str, bytes]:
    """Italy.xlsx beside the country folder (Kaggle-style extra columns, text Hgb with decimal comma, '_'), India.xlsx
    inside it (header variants, a missing patient row, an unknown age)."""
    italy = [["Number", "Hgb", "Gender", "Age", "Note", None],
             [1, 9.3, "F", 82, None, None], [2, "10,2", "Female", 77, "ok", None], [4, "11,7", "f", 73, None, None],
             [9, 9.8, "M", 61, None, None], [17, "12,9", "Uomo", 78, None, None], [35, "15,7", "M", 36, None, None],
             [93, "_", "M", 53, "withdrawn", None], [95, "13,8", "M", 31, None, None],
             [100, 14.5, "F", 63, None, None], [None, None, None, None, None, None]]
    india = [["N°", "Hb (g/dL)", "Sex", "Age"],
             [1, 12.2, "M", 29], [3, 10.7, "F", 30], [5, 7.8, "F", 29], [6, 11.8, "F", 55], [7, "9,2", "F", None],
             [9, 13.4, "M", 41]]
    return {"Italy.xlsx": xlsx(italy, inline=("10,2",)), "India/India.xlsx": xlsx(india)}


def _real_encoding(country: str, number: int, kind: str) -> str:
    """The archive's mix of encodings: white-background cut-outs for Italy 2-31 (RGB for Italy 9's palpebral),
    corrupt iCCP chunks on some palpebral masks, some 16-bit files, RGBA elsewhere."""
    if country == "Italy" and number <= 31:
        return "rgb_white" if (number, kind) == (9, "palpebral") else "white"
    if kind == "palpebral" and number % 4 == 0:
        return "iccp_bad_crc"
    return "rgba16" if number % 7 == 0 else "rgba"


def write_real_names_archive(out: pathlib.Path, reference: pathlib.Path, *, photo_size=(36, 48),
                             mask_size=(18, 24)) -> pathlib.Path:
    """A zip with every file name of the real archive (``reference/file_list.csv``) holding tiny fake images, and
    the real spreadsheets; copies like ``_palpebral(1).png`` are byte-identical to their originals, as in the real
    archive."""
    by_folder: dict[tuple[str, int], list[str]] = {}
    with open(reference / "file_list.csv", newline="") as f:
        for row in csv.DictReader(f):
            by_folder.setdefault((row["Region"], int(row["Folder"])), []).append(row["Filename"])
    patients = []
    for (country, number), names in sorted(by_folder.items()):
        masks, extra, copies = {}, {}, {}
        for name in names:
            if "(" in name:
                copies[name] = name.split("(")[0] + ".png"
            elif name == ".DS_Store":
                extra[name] = b"\x00\x00\x00\x01Bud1"
            elif name.endswith(".png"):
                base = name[:-4].lower().replace("palplebral", "palpebral").replace("papebral", "palpebral")
                kind = "forniceal_palpebral" if base.endswith("forniceal_palpebral") else base.rsplit("_", 1)[-1]
                masks[kind] = (name, _real_encoding(country, number, kind))
        photo_name = next(n for n in names if n.endswith(".jpg"))
        patients.append(Patient(country, number, photo_name, masks, extra=extra, copies=copies))
    sheets = {"India.xlsx": (reference / "India.xlsx").read_bytes(),
              "Italy/Italy.xlsx": (reference / "Italy.xlsx").read_bytes()}
    return write_archive(out, patients, sheets, photo_size=photo_size, mask_size=mask_size)
