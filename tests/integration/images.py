"""Real disk images for integration tests: an ext4 filesystem with files, made by mke2fs -d
and converted to qcow2; changes applied with qemu-io, references taken with qemu-img."""

import atexit
import random
import shutil
import subprocess
import tempfile
from pathlib import Path


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


_BUILT: dict[tuple[int, int], Path] = {}
_CACHE_DIR = Path(tempfile.mkdtemp(prefix="tessera-test-images-"))
atexit.register(shutil.rmtree, _CACHE_DIR, True)


def make_fs_qcow2(workdir: Path, name: str, size_mib: int = 96, seed: int = 1) -> Path:
    """A qcow2 holding an ext4 filesystem with deterministic text and binary files (built
    once per size and seed in this test session, then copied)."""
    key = (size_mib, seed)
    if key not in _BUILT:
        _BUILT[key] = _build(_CACHE_DIR / f"{size_mib}-{seed}", size_mib, seed)
    image = workdir / f"{name}.qcow2"
    shutil.copyfile(_BUILT[key], image)
    return image


def _build(workdir: Path, size_mib: int, seed: int) -> Path:
    name = "image"
    workdir.mkdir(parents=True)
    files = workdir / f"{name}-files"
    files.mkdir(parents=True)
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 8)).hex() for _ in range(300)]
    for i in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2_000, 40_000)))
        (files / f"doc-{i}.txt").write_text(text)
    for i in range(6):
        (files / f"blob-{i}.bin").write_bytes(rng.randbytes(rng.randint(100_000, 2_000_000)))
    raw = workdir / f"{name}.raw"
    run("mke2fs", "-q", "-F", "-t", "ext4", "-d", files, raw, f"{size_mib}M")
    image = workdir / f"{name}.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    raw.unlink()
    shutil.rmtree(files)
    return image


def qemu_io(image: Path, *commands: str) -> None:
    argv: list[str | Path] = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    run(*argv, image)


def reference(image: Path, dest: Path) -> Path:
    """The image's content now, as a raw file to compare restores with."""
    run("qemu-img", "convert", "-O", "raw", image, dest)
    return dest


def identical(a: Path, b: Path) -> bool:
    return (
        subprocess.run(
            ["qemu-img", "compare", str(a), str(b)], capture_output=True, check=False
        ).returncode
        == 0
    )
