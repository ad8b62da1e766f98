"""The one ``logitcache`` command: its help, how fast it starts, and how failures reach the user.

Every failure a user can act on is one line on stderr, ``logitcache: error: ...``, with an exit
status that says what kind: 2 a bad request, 1 work that did not succeed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import logitcache
from logitcache.cli import build_parser, command_flags, error_status, main, small_pages_for_numpy
from logitcache.client.commands import JobNotCompleted
from logitcache.client.errors import InvalidArgument, NotFound

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "logitcache.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every leaf command: ("precompute",), ("bench", "stream"), ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from commands(child, (*path, name))
            return
    yield path, parser


ALL_COMMANDS = list(commands(build_parser()))
COMMAND_IDS = [" ".join(path) for path, _ in ALL_COMMANDS]


def test_every_command_is_there():
    names = {" ".join(path) for path, _ in ALL_COMMANDS}
    assert names == {
        "precompute", "inspect", "serve", "submit", "jobs", "fetch", "demo-teacher", "demo-data",
        "demo-service", "bench capture", "bench distill", "bench stream", "bench lookup",
        "bench storage", "bench soak", "datasets finish", "datasets resume", "datasets delete",
        "gc", "tokens create", "tokens list", "tokens revoke", "tokens limit", "tokens unflag",
        "datasets share", "audit verify", "provenance",
    }  # fmt: skip


@pytest.mark.parametrize(("path", "parser"), ALL_COMMANDS, ids=COMMAND_IDS)
def test_every_option_and_argument_has_a_help_text(path, parser):
    undocumented = [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert not undocumented, f"logitcache {' '.join(path)}: {undocumented}"


@pytest.mark.parametrize(("path", "parser"), ALL_COMMANDS, ids=COMMAND_IDS)
def test_help_of_every_command(capsys, path, parser):
    with pytest.raises(SystemExit) as exit:
        main([*path, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: logitcache {' '.join(path)}")
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in out


def test_old_names_still_work():
    # Improved names keep the old one as an alias; these are the ones scripts and docs use.
    args = build_parser().parse_args(
        ["precompute", "--teacher", "t", "--data", "d.jsonl", "--out", "s", "--dataset", "x"]
    )
    assert (args.out, args.dataset, args.overflow) == ("s", "x", "error")


def test_help_and_client_commands_start_without_vllm_torch_or_the_engine():
    probe = (
        "import sys\n"
        "from logitcache.cli import build_parser\n"
        "build_parser().parse_args(['jobs', '--server', 'h:1'])\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch', 'transformers')"
        " or m.startswith('logitcache.server.engine.vllm')])\n"
    )
    r = subprocess.run(
        [sys.executable, "-P", "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_module_and_console_script_run_the_same_command():
    assert cli("--help").returncode == 0
    script = Path(sys.executable).parent / "logitcache"
    r = subprocess.run([str(script), "jobs", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--server" in r.stdout


# ---- failures: one line, one exit status ------------------------------------------------------


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("logitcache: error: "), err
    return lines[0]


def test_missing_store_is_a_bad_request(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "no-store")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "no-store") in line and "does not exist" in line


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from logitcache.bench.synthetic import synthetic_store

    return Path(synthetic_store(tmp_path_factory.mktemp("cli") / "store", 2048, 256, 4))


def test_unknown_dataset_is_a_bad_request(capsys, store):
    assert main(["inspect", str(store), "--dataset", "no-such-dataset"]) == 2
    assert "no-such-dataset" in one_error_line(capsys.readouterr().err)
    assert main(["inspect", str(store), "--json"]) == 0
    assert [d["name"] for d in json.loads(capsys.readouterr().out)["datasets"]] == ["bench"]


def test_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["precompute", "--teacher", "t", "--data", "d", "--out", "s", "--dataset", "x",
              "--top-k", "many"])  # fmt: skip
    assert exit.value.code == 2
    assert "argument --top-k: invalid int value: 'many'" in capsys.readouterr().err


def test_flags_that_mean_nothing_together_fail_before_any_work(tmp_path):
    # A real process: the check runs before the server, the engine or the data file is loaded.
    r = cli("precompute", "--teacher", str(tmp_path / "t"), "--data", str(tmp_path / "d.jsonl"),
            "--out", str(tmp_path / "s"), "--dataset", "x", "--top-p", "0.9", "--top-k", "8")  # fmt: skip
    assert r.returncode == 2
    assert "--max-k" in one_error_line(r.stderr)
    assert not (tmp_path / "s").exists()


def test_a_server_that_does_not_answer_is_named_by_its_status_code():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("jobs", "--server", f"127.0.0.1:{port}", "--timeout", "2")
    assert r.returncode == 2
    assert one_error_line(r.stderr).startswith("logitcache: error: UNAVAILABLE: ")


def test_an_os_error_is_one_line_with_its_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = cli("demo-data", str(blocker / "docs.jsonl"), "--documents", "1")
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert str(blocker) in line and "Traceback" not in r.stderr


def precompute_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["precompute", "--teacher", "t", "--data", "d", "--out", "s", "--dataset", "x", *flags]
    )


@pytest.mark.parametrize(
    ("flags", "flag"),
    [((), "--top-k"), (("--top-p", "0.9"), "--max-k"), (("--mode", "sampled"), "--samples")],
)
def test_errors_naming_request_fields_name_the_flags_typed(flags, flag):
    error = InvalidArgument("k must be between 1 and 256; max_len too", fields=["k", "max_len"])
    status, line = error_status(error, command_flags(precompute_args(*flags)))
    assert (status, line) == (
        2,
        f"logitcache: error: {flag} must be between 1 and 256; --max-len too",
    )


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (NotFound("dataset 'x' does not exist"), 2, "error: dataset 'x' does not exist"),
        (JobNotCompleted("job j (d) failed: boom"), 1, "error: job j (d) failed: boom"),
        (OSError(28, "No space left on device", "/s/x"), 1, "error: /s/x: No space left on device"),
        (
            KeyboardInterrupt(),
            130,
            "interrupted; sealed work is kept, rerun the same command to resume",
        ),
    ],
    ids=["typed", "job", "disk-full", "interrupt"],
)
def test_the_one_mapping_from_errors_to_exit_statuses(error, status, line):
    assert error_status(error, {}) == (status, f"logitcache: {line}")


def test_a_bug_is_not_dressed_up_as_a_user_error():
    assert error_status(RuntimeError("a bug"), {}) is None
    assert error_status(OSError("no errno"), {}) is None


def test_python_dash_m_logitcache_is_the_command() -> None:
    run = subprocess.run(
        [sys.executable, "-P", "-m", "logitcache", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert logitcache.__version__ in run.stdout


def test_commands_turn_numpys_huge_pages_off_unless_the_user_chose(monkeypatch) -> None:
    from numpy._core.multiarray import _set_madvise_hugepage

    before = _set_madvise_hugepage(True)
    try:
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
        small_pages_for_numpy()
        assert _set_madvise_hugepage(True) is True  # the user's choice stands
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE")
        small_pages_for_numpy()
        assert _set_madvise_hugepage(True) is False
    finally:
        _set_madvise_hugepage(before)
