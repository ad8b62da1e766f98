"""server_path confinement on a real directory tree: inside a root is accepted, anything that
resolves outside (.., symlinks, a look-alike prefix) is refused the same way whether or not it
exists."""

from __future__ import annotations

import pytest

from logitcache.client.errors import PermissionDenied
from logitcache.server.policy.paths import confine_input


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "inputs" / "team").mkdir(parents=True)
    (tmp_path / "inputs" / "team" / "data.jsonl").write_text("{}\n")
    (tmp_path / "inputs-secret").mkdir()
    (tmp_path / "inputs-secret" / "keys.json").write_text('{"aws": "AKIA..."}')
    (tmp_path / "inputs" / "link").symlink_to(tmp_path / "inputs-secret" / "keys.json")
    return tmp_path


def test_a_file_inside_an_allowed_root_is_accepted(tree) -> None:
    path = confine_input(str(tree / "inputs" / "team" / "data.jsonl"), [tree / "inputs"])
    assert path == (tree / "inputs" / "team" / "data.jsonl").resolve()
    assert confine_input(
        str(tree / "inputs" / "team" / ".." / "team" / "data.jsonl"), [tree / "inputs"]
    )


@pytest.mark.parametrize(
    "relative",
    [
        "inputs-secret/keys.json",  # a sibling whose name starts like the root
        "inputs/../inputs-secret/keys.json",
        "inputs/link",  # a symlink out of the root
        "inputs-secret/missing.json",
        "/etc/passwd",
    ],
)
def test_a_path_that_resolves_outside_is_refused_without_saying_if_it_exists(
    tree, relative
) -> None:
    with pytest.raises(PermissionDenied) as raised:
        confine_input(str(tree / relative), [tree / "inputs"])
    assert (
        str(raised.value) == "server_path is outside the directories this server allows inputs from"
    )
    assert raised.value.fields == ("server_path",)


def test_no_roots_means_server_path_inputs_are_off(tree) -> None:
    with pytest.raises(PermissionDenied, match="off on this server"):
        confine_input(str(tree / "inputs" / "team" / "data.jsonl"), [])
