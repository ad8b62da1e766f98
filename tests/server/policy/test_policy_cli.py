"""The offline policy commands: the first admin's token from the state directory, listed and
revoked without ever printing a token again; ``audit verify`` exits 0 or 1 naming the line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from logitcache.cli import main
from logitcache.server.policy.access import authenticate
from logitcache.server.policy.audit import AuditEvent, AuditLog
from logitcache.server.policy.state import Role, open_state


def test_create_prints_a_token_once_that_authenticates_as_the_admin(tmp_path) -> None:
    state_dir = tmp_path / "state"
    logitcache = Path(sys.executable).with_name("logitcache")
    done = subprocess.run(
        [str(logitcache), "tokens", "create", "--state", str(state_dir), "--user", "root",
         "--role", "admin", "--group", "ops"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONSAFEPATH": "1"},
    )  # fmt: skip
    token = done.stdout.strip()
    assert token.startswith("lc_") and "\n" not in token
    assert "shown once" in done.stderr and token not in done.stderr
    state = open_state(state_dir)
    principal = authenticate(state, [("authorization", f"Bearer {token}")])
    assert (principal.user, principal.role, principal.groups) == ("root", Role.ADMIN, ("ops",))
    state.close()


def test_list_and_revoke_never_show_a_token(tmp_path, capsys) -> None:
    state = str(tmp_path)
    assert main(["tokens", "create", "--state", state, "--user", "ana", "--role", "consumer"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["tokens", "list", "--state", state, "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["user"], row["role"], row["revoked_at"]) == ("ana", "consumer", None)
    assert main(["tokens", "revoke", "--state", state, row["id"]]) == 0
    assert main(["tokens", "list", "--state", state]) == 0
    listed = capsys.readouterr()
    assert "revoked" in listed.out and token not in listed.out + listed.err
    assert main(["tokens", "revoke", "--state", state, "tok_missing"]) == 2
    assert "no token 'tok_missing'" in capsys.readouterr().err
    assert main(["tokens", "create", "--state", state, "--user", "", "--role", "admin"]) == 2


def test_audit_verify_exits_by_what_it_finds(tmp_path, capsys) -> None:
    with AuditLog(tmp_path / "audit") as log:
        for i in range(3):
            log.record(AuditEvent(who="ana", action="StreamDataset", positions=i))
    assert main(["audit", "verify", str(tmp_path / "audit")]) == 0
    assert "intact: 4 lines" in capsys.readouterr().out
    [path] = (tmp_path / "audit").glob("audit-*.jsonl")
    content = path.read_text().splitlines(keepends=True)
    path.write_text("".join(content[:2] + content[3:]))
    assert main(["audit", "verify", str(tmp_path / "audit")]) == 1
    assert f"{path}:3:" in capsys.readouterr().err
    assert main(["audit", "verify", str(tmp_path / "nowhere")]) == 2


def test_limits_flags_and_shares_offline(tmp_path, capsys) -> None:
    state = str(tmp_path)
    assert main(["tokens", "create", "--state", state, "--user", "ana", "--role", "producer"]) == 0
    capsys.readouterr()
    assert main(["tokens", "list", "--state", state, "--json"]) == 0
    token_id = json.loads(capsys.readouterr().out)["id"]
    assert main(["tokens", "limit", "--state", state, token_id, "--concurrent-streams", "2"]) == 0
    assert "limits=concurrent_streams=2" in capsys.readouterr().out
    assert main(["tokens", "limit", "--state", state, token_id]) == 2  # no limit given
    assert main(["tokens", "unflag", "--state", state, token_id]) == 0
    capsys.readouterr()
    share = ["datasets", "share", "built-offline", "--state", state]
    assert main([*share, "--owner", "ana", "--group", "nlp", "--user", "bo"]) == 0
    assert "owner ana, users bo, groups nlp" in capsys.readouterr().out
    assert main([*share, "--remove-user", "bo"]) == 0
    assert "owner ana, users -, groups nlp" in capsys.readouterr().out
