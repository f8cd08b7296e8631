"""Writes conjunctiva phantom photos into a folder: a stand-in for a folder of phone photos, to try ``predict``.

    python -m experiments.phantom_photos --out=/tmp/photos [--seed=2] [--count=8] [--long_side=256]

Writes ``<out>/phantom_s<seed>_<i>.jpg`` (JPEG quality 92) for phantom examples ``0 .. count-1`` of phantom set
``--seed`` (`anemia_jax.data.datasets.conjunctiva_phantom.phantom`; seed 0 is the training set ``res256``, seed 1 the
held-out set ``res256_heldout``, so the default seed 2 gives photos no run or experiment has used), ``sex.csv``
(``file,sex`` as ``predict`` reads it; every fourth photo's sex left empty, i.e. unknown) and ``truth.csv``
(``file,patient_id,sex,hgb,anemic``: the phantom's laboratory values, to compare with the estimates).
"""

from __future__ import annotations

import csv
import pathlib
import sys
from collections.abc import Sequence

import PIL.Image
from absl import flags

from anemia_jax import cli
from anemia_jax.data.datasets.conjunctiva_phantom import phantom


def write_photos(out: str | pathlib.Path, *, seed: int, count: int, long_side: int = 256) -> list[pathlib.Path]:
    """Writes the photos, ``sex.csv`` and ``truth.csv`` (module docstring); returns the photo paths."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, sex_rows, truth_rows = [], [], []
    for ex in phantom.generate(seed, count, long_side=long_side):
        k = len(paths)
        name = f"phantom_s{seed}_{k}.jpg"
        PIL.Image.fromarray(ex.image).save(out / name, quality=92)
        paths.append(out / name)
        sex_rows.append([name, "" if k % 4 == 3 else ex.gender])
        truth_rows.append([name, ex.patient_id, ex.gender, f"{ex.hgb:.2f}", int(ex.anemic)])
    for file, header, rows in (("sex.csv", ["file", "sex"], sex_rows),
                               ("truth.csv", ["file", "patient_id", "sex", "hgb", "anemic"], truth_rows)):
        with open(out / file, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return paths


def main(argv: Sequence[str]) -> int:
    cmd = cli.Command("python -m experiments.phantom_photos", __doc__)
    fv = cmd.flags
    flags.DEFINE_string("out", None, "Folder to write the photos into.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_integer("seed", 2, "Phantom set (0: training set, 1: held-out set).", flag_values=fv)
    flags.DEFINE_integer("count", 8, "Number of photos.", flag_values=fv)
    flags.DEFINE_integer("long_side", 256, "Photo height in pixels (width 3/4 of it).", flag_values=fv)
    try:
        if cmd.parse(argv) is None:
            return cli.EXIT_OK
    except cli.CommandLineError as e:
        return cmd.fail(e)
    paths = write_photos(cmd.out, seed=cmd.seed, count=cmd.count, long_side=cmd.long_side)
    print(f"Wrote {len(paths)} photos, sex.csv and truth.csv to {cmd.out}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
