"""The packages (issue 16): ``make deb`` and ``make rpm`` from one staged ``make install``.

One build per module (``packages``): the .deb is unpacked into a scratch root, its launcher
runs on the system's Python from the private venv (no package of this tree leaks in), its
unit passes ``systemd-analyze verify --root`` there, and the RPM lists the same files.

With ``TESSERA_TEST_SYSTEM_INSTALL=1`` (CI's throwaway machine, set in ``.ci/run``) the .deb
is also installed system-wide with ``dpkg -i``: ``tessera --version`` from PATH, the user the
postinst made, ``systemd-analyze verify`` on the installed unit; then purged. A developer's
machine never gets a package installed unless asked.
"""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APP = Path("usr/lib/tessera/venv")
UNIT = Path("usr/lib/systemd/system/tessera.service")


@dataclass(frozen=True)
class Packages:
    deb: Path
    rpm: Path | None  # None without rpmbuild


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, **kwargs
    )  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    for tool in ("dpkg-deb", "fakeroot", "systemd-analyze"):
        assert shutil.which(tool), f"{tool} missing: make sysdeps installs it"
    out = tmp_path_factory.mktemp("pkg")
    targets = ["deb", "rpm"] if shutil.which("rpmbuild") else ["deb"]
    run("make", "-C", ROOT, *targets, f"OUT={out}")  # one make: both from one staged install
    rpm = None
    if "rpm" in targets:
        (rpm,) = out.glob("tessera-*.rpm")
    (deb,) = out.glob("tessera_*.deb")
    return Packages(deb, rpm)


def deb_files(deb: Path) -> set[str]:
    """Every path in the .deb that is not a directory, as ``/usr/bin/tessera``."""
    listing = run("dpkg-deb", "--contents", deb).stdout.splitlines()
    # "-rw-r--r-- root/root 1234 2026-12-07 10:35 ./usr/bin/x" (symlinks end "-> target")
    return {line.split()[5].removeprefix(".") for line in listing if not line.startswith("d")}


def test_control_names_the_system_packages(packages: Packages) -> None:
    control = run("dpkg-deb", "--field", packages.deb).stdout
    fields = dict(line.split(": ", 1) for line in control.splitlines() if ": " in line)
    depends = fields["Depends"]
    assert f"python3.{sys.version_info.minor}" in depends  # the venv's interpreter
    assert "qemu-utils" in depends  # qemu-img and qemu-nbd
    assert fields["Recommends"] == "nbdkit, libnbd-bin"
    assert fields["Package"] == "tessera"


def test_launcher_runs_from_the_unpacked_tree(packages: Packages, tmp_path: Path) -> None:
    root = tmp_path / "root"
    run("dpkg-deb", "--extract", packages.deb, root)
    python = root / APP / "bin/python"
    launcher = root / "usr/bin/tessera"
    assert os.readlink(launcher) == "../lib/tessera/venv/bin/tessera"
    # its shebang names the installed venv, not the staging directory
    assert launcher.read_text().splitlines()[0] == f"#!/{APP}/bin/python"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # no PYTHONPATH, no VIRTUAL_ENV
    done = run(python, launcher, "--version", env=env, cwd=tmp_path)
    assert done.stdout.startswith("tessera 0.1.0 (Python 3.")
    where = run(
        python,
        "-c",
        "import engine, plugins, sys; print(engine.__file__, plugins.__path__[0])",
        env=env,
        cwd=tmp_path,
    )
    for path in where.stdout.split():
        assert Path(path).is_relative_to(root / APP), where.stdout
    assert not Path(sys.prefix).is_relative_to(root)  # the test's own Python is elsewhere


def test_unit_verifies_in_the_unpacked_tree(packages: Packages, tmp_path: Path) -> None:
    root = tmp_path / "root"
    run("dpkg-deb", "--extract", packages.deb, root)
    unit = (root / UNIT).read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    program = exec_start.removeprefix("ExecStart=").split()[0]
    assert program == "/usr/bin/tessera"
    assert (root / program.removeprefix("/")).is_symlink()
    # verify on this machine's systemd (a scratch --root has no sysinit.target or /bin/kill);
    # ExecStart names the unpacked launcher, which must be executable for verify to pass.
    checked = tmp_path / "tessera.service"
    checked.write_text(unit.replace(program, str(root / program.removeprefix("/"))))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", checked],
        capture_output=True,
        text=True,
        check=False,
    )
    mentions = [line for line in done.stderr.splitlines() if "tessera.service" in line]
    assert done.returncode == 0, done.stderr
    assert mentions == []


def test_layout(packages: Packages) -> None:
    files = deb_files(packages.deb)
    assert {
        "/usr/bin/tessera",
        f"/{UNIT}",
        "/usr/lib/sysusers.d/tessera.conf",
        "/usr/lib/tmpfiles.d/tessera.conf",
        "/etc/tessera/config.yaml.example",
        "/usr/share/doc/tessera/LICENSE",
        "/usr/share/doc/tessera/README.md",
    } <= files
    # engine and plugins only inside the private venv, never beside the system's packages
    squatting = [f for f in files if "/engine/" in f or "/plugins/" in f]
    assert squatting
    assert all(f.startswith(f"/{APP}/lib/python3.") for f in squatting), squatting[:5]
    assert not any(f.startswith(f"/{APP}/bin/pip") for f in files)
    conffiles = run("dpkg-deb", "--info", packages.deb, "conffiles").stdout.split()
    assert conffiles == ["/etc/tessera/config.yaml.example"]


def test_rpm_lists_the_same_files(packages: Packages) -> None:
    # A failure, not a skip: `make check` installs rpm (SYSPKGS), so a missing rpmbuild is
    # a broken set-up, not an optional test.
    assert packages.rpm is not None, "no rpmbuild (Debian: apt-get install rpm; make sysdeps does)"
    listing = run("rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\\n]", packages.rpm)
    rpm_files = {
        line.split()[1] for line in listing.stdout.splitlines() if not line.startswith("d")
    }
    assert rpm_files == deb_files(packages.deb)
    requires = run("rpm", "-qp", "--requires", packages.rpm).stdout.split("\n")
    assert f"python3.{sys.version_info.minor}" in requires
    assert "qemu-img" in requires


@pytest.mark.skipif(
    os.environ.get("TESSERA_TEST_SYSTEM_INSTALL") != "1",
    reason="installs system-wide: set TESSERA_TEST_SYSTEM_INSTALL=1 (CI does)",
)
def test_system_install(packages: Packages, tmp_path: Path) -> None:
    assert os.geteuid() == 0, "dpkg -i needs root"
    run("dpkg", "-i", packages.deb)
    try:
        assert shutil.which("tessera", path="/usr/bin") == "/usr/bin/tessera"
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path)}
        done = run("tessera", "--version", env=env, cwd=tmp_path)
        assert done.stdout.startswith("tessera 0.1.0 ")
        assert run("getent", "passwd", "tessera").stdout.startswith("tessera:")
        verify = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", f"/{UNIT}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0, verify.stderr
        assert [line for line in verify.stderr.splitlines() if "tessera.service" in line] == []
    finally:
        run("dpkg", "--purge", "tessera")
    assert not Path("/usr/bin/tessera").exists()
