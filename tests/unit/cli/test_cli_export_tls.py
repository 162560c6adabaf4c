"""``tessera export``'s TLS options: which files they name, which combinations are refused,
and that TCP is served in clear only on loopback or with an explicit ``--no-tls`` (checked
before the store is opened: the store in these command lines does not exist)."""

from pathlib import Path

import pytest

from engine.cli.commands.export import tls_files, uris
from engine.cli.main import build_parser, main
from engine.core.errors import ConfigError
from engine.io.nbd.tls import ServerTls, TlsFilesError
from tests.nbd_tls import NbdTls, make_nbd_tls

EXPORT = ["export", "snap", "--store", "/nonexistent/s"]


def files(*argv: str) -> ServerTls | None:
    return tls_files(build_parser().parse_args([*EXPORT, *argv]))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> NbdTls:
    return make_nbd_tls(tmp_path_factory.mktemp("nbd-tls"))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "[::]", "[2001:db8::1]", "nbd.example"])
def test_tcp_off_loopback_in_clear_needs_no_tls(host: str) -> None:
    with pytest.raises(ConfigError, match=r"not a loopback address .* --no-tls"):
        files("--listen", f"{host}:10809")
    assert files("--listen", f"{host}:10809", "--no-tls") is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7", "[::1]", "localhost"])
def test_loopback_and_unix_sockets_stay_allowed_in_clear(host: str) -> None:
    assert files("--listen", f"{host}:10809") is None
    assert files("--socket", "/run/x.sock") is None


def test_tls_files_from_a_directory_or_one_by_one(certs: NbdTls) -> None:
    mutual = files("--listen", "0.0.0.0:0", "--tls-dir", str(certs.server))
    assert mutual == ServerTls(
        certs.server / "server-cert.pem",
        certs.server / "server-key.pem",
        certs.server / "ca-cert.pem",
    )
    assert mutual.mutual
    open_ = files("--listen", "0.0.0.0:0", "--tls-dir", str(certs.server_open))
    assert open_ is not None and open_.ca is None and not open_.mutual
    cert, key = certs.server / "server-cert.pem", certs.server / "server-key.pem"
    one_by_one = files("--listen", "[::]:0", "--tls-cert", str(cert), "--tls-key", str(key))
    assert one_by_one == ServerTls(cert, key)
    with_ca = files(
        "--socket", "/run/x.sock", "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-ca", str(certs.server / "ca-cert.pem"),
    )  # fmt: skip
    assert with_ca is not None and with_ca.mutual


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "ca.pem"], "--tls-ca needs --tls-cert and --tls-key"),
        (["--tls-dir", "d", "--tls-key", "k.pem"], "--tls-dir holds the key and the CA"),
        (["--no-tls", "--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_tls_options_that_do_not_fit_together(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        files("--listen", "127.0.0.1:0", *argv)


def test_a_directory_without_the_server_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TlsFilesError, match=r"server-cert\.pem: no such file"):
        files("--listen", "0.0.0.0:0", "--tls-dir", str(tmp_path))


def test_refusals_are_exit_2_before_the_store_is_opened(
    capsys: pytest.CaptureFixture[str], certs: NbdTls
) -> None:
    assert main([*EXPORT, "--listen", "0.0.0.0:10809"]) == 2
    assert "served in clear" in capsys.readouterr().err
    mismatched = ["--tls-cert", str(certs.server / "server-cert.pem")]
    mismatched += ["--tls-key", str(certs.client / "client-key.pem")]
    assert main([*EXPORT, "--listen", "0.0.0.0:10809", *mismatched]) == 2
    assert "NBD TLS" in capsys.readouterr().err


def test_uris_say_nbds_when_clients_must_speak_tls() -> None:
    addresses = ["127.0.0.1:10809", "unix:/run/x.sock"]
    assert uris(addresses, "d") == ["nbd://127.0.0.1:10809/", "nbd+unix:///?socket=/run/x.sock"]
    assert uris(addresses, "d", tls=True) == [
        "nbds://127.0.0.1:10809/",
        "nbds+unix:///?socket=/run/x.sock",
    ]


def test_the_help_names_the_files_the_server_reads() -> None:
    from engine.cli import export as options
    from engine.io.nbd import tls

    names = (options.CA_CERT, options.SERVER_CERT, options.SERVER_KEY)
    assert names == (tls.CA_CERT, tls.SERVER_CERT, tls.SERVER_KEY)
