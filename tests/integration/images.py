"""Real disk images for integration tests: an ext4 filesystem with files, made by mke2fs -d
and converted to qcow2; changes applied with qemu-io, references taken with qemu-img."""

import random
import subprocess
from pathlib import Path


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def make_fs_qcow2(workdir: Path, name: str, size_mib: int = 96, seed: int = 1) -> Path:
    """A qcow2 holding an ext4 filesystem with deterministic text and binary files."""
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
