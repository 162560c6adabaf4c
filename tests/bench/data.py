"""Realistic bench data: an ext4 filesystem image populated from this machine's /usr.

``mke2fs -d`` copies a directory tree into a new image without mounting anything, so the
image holds real file contents (text, libraries, bytecode, compressed docs) laid out by a
real filesystem, plus its free space as zeros — the mix a VM disk has. The image is cached
under ``bench-data/`` so repeated runs measure the same bytes.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "bench-data"
# Trees that exist on every Debian machine with Python: docs, shared data, the stdlib.
SOURCES = [
    Path("/usr/share/doc"),
    Path("/usr/share/locale"),
    Path("/usr/lib/x86_64-linux-gnu"),
    Path(sys.base_prefix) / "lib",
]


def _stage(staging: Path, budget: int) -> int:
    """Hard-link (or copy) files from SOURCES into ``staging`` until ``budget`` bytes."""
    total = 0
    for source in SOURCES:
        if not source.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(source):
            for name in sorted(files):
                src = Path(dirpath) / name
                if src.is_symlink() or not src.is_file():
                    continue
                size = src.stat().st_size
                if total + size > budget:
                    return total
                dst = staging / source.name / Path(dirpath).relative_to(source) / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
                total += size
    return total


def fs_image(size_mib: int, fill: float = 0.7) -> Path:
    """An ext4 image of ``size_mib`` MiB about ``fill`` full of real files (cached)."""
    CACHE.mkdir(exist_ok=True)
    image = CACHE / f"fs-{size_mib}M.raw"
    if image.exists():
        return image
    staging = CACHE / f"staging-{size_mib}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _stage(staging, int(size_mib * 1024 * 1024 * fill))
        tmp = image.with_suffix(".tmp")
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(staging), str(tmp), f"{size_mib}M"],
            check=True,
        )
        tmp.rename(image)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return image


def data_chunks(image: Path, chunk_size: int, limit: int | None = None) -> list[bytes]:
    """The image's non-zero slots (zero slots are never hashed or stored)."""
    out = []
    with image.open("rb") as f:
        while chunk := f.read(chunk_size):
            if any(chunk):
                out.append(chunk)
                if limit is not None and len(out) >= limit:
                    break
    return out


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SUMMARY = re.compile(
    r"read ([\d.]+) (B|KiB|MiB|GiB|TiB)\b.* ([\d.]+) s, ([\d.]+) (B|KiB|MiB|GiB|TiB)/s"
)
_WROTE = re.compile(r"wrote ([\d.]+) (B|KiB|MiB|GiB|TiB), ([\d.]+) s, ([\d.]+) (B|KiB|MiB|GiB)/s")


def job_summary(out: str, kind: str = "backup") -> tuple[float, float, float]:
    """(MiB, job seconds, MB/s) from the CLI's job summary line: a backup's ``read N UNIT …,
    S s, R UNIT/s`` or a restore's ``wrote N UNIT, S s, R UNIT/s`` (binary units, as
    ``engine.core.units`` writes them); MB/s is decimal, as every bench figure."""
    m = (_SUMMARY if kind == "backup" else _WROTE).search(out)
    assert m, out
    size, unit, seconds, rate, rate_unit = m.groups()
    return (
        float(size) * _UNITS[unit] / 2**20,
        float(seconds),
        float(rate) * _UNITS[rate_unit] / 1e6,
    )
