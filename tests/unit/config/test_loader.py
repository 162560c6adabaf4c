"""Configuration loading: the example loads; bad files give file, key path and line."""

from pathlib import Path

import pytest

from engine.config.loader import load
from engine.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def test_example_config_loads() -> None:
    config = load(ROOT / "config.example.yaml")
    assert config.store("main").path == Path("/var/lib/tessera/store")
    assert config.store().passphrase_file is not None


GOOD = """\
stores:
  - name: main
    path: /srv/store
engines:
  - name: lab
    url: https://127.0.0.1:1/ovirt-engine/api
    username: admin@internal
    password_file: /etc/tessera/engine-password
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace("    path: /srv/store", "    path: /srv/store\n    colour: red"),
            "stores[0] (line 4): Object contains unknown field `colour`",
        ),
        (
            GOOD.replace("name: lab", "name: 7"),
            "engines[0].name (line 5): Expected `str`, got `int`",
        ),
        (
            GOOD.replace("    username: admin@internal\n", ""),
            "engines[0] (line 5): Object missing required field `username`",
        ),
        ("stores: [\n", "(line 2): not valid YAML"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_bad_files_name_file_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}")
    assert message in str(e.value)


def test_drop_ins_extend_lists(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(GOOD)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-more.yaml").write_text("stores:\n  - name: second\n    path: /x\n")
    config = load(tmp_path / "config.yaml", tmp_path / "conf.d")
    assert [s.name for s in config.stores] == ["main", "second"]
    with pytest.raises(ConfigError, match="has 2 stores: name one"):
        config.store()
    with pytest.raises(ConfigError, match="no engine named 'nope'"):
        config.engine("nope")
