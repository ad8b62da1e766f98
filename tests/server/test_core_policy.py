"""The licence policy, provenance, sensitive-data filters and server_path confinement in the core:
jobs, read-through and the offline precompute on the reference engine and real Zarr stores.

Teachers with other licences are the demo teacher under another configuration (the same engine),
so no second model is loaded.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from counting_engine import REFERENCE_K, CountingEngine
from job_managers import USE, last_update, manager, sequences
from test_core_readthrough import cache_on

import logitcache
from logitcache.client.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from logitcache.server.jobs import JobSpec, JobState
from logitcache.server.policy.admission import Admission
from logitcache.server.policy.decision import Purpose, Student, UseRequest
from logitcache.server.policy.licensing import TeacherLicences
from logitcache.server.precompute import PrecomputeRequest, precompute
from logitcache.server.spool import teacher_tokenize
from logitcache.server.store.store import open_store
from logitcache.server.teachers.registry import Teacher, TeacherRegistry

K = REFERENCE_K
COMMERCIAL_QWEN = UseRequest("", Purpose.COMMERCIAL, Student("tiny-distilled", "qwen2"), "lab")
SECRET = {"api_key": "AKIA" + "Q" * 16, "balance": 918273645}


@pytest.fixture
def demo(reference_teachers: TeacherRegistry) -> Teacher:
    teacher = reference_teachers.get("demo")
    assert isinstance(teacher.engine, CountingEngine)
    return teacher


def under(demo: Teacher, name: str, licence: str | None, card: str | None = "keep") -> Teacher:
    """The demo teacher served as ``name`` with ``licence`` in its configuration (and, unless
    kept, ``card`` as its model card's licence)."""
    info = demo.info if card == "keep" else replace(demo.info, license=card)
    return Teacher(replace(demo.config, name=name, license=licence), info, demo.engine)


@pytest.fixture
def registry(demo: Teacher) -> TeacherRegistry:
    return TeacherRegistry(
        [
            demo,
            under(demo, "llama", "llama2"),
            under(demo, "gemma", "gemma"),
            under(demo, "unlicensed", None, card=None),
        ]
    )


def run_job(
    url: str,
    teachers: TeacherRegistry,
    spec: JobSpec,
    *,
    texts: list[str] | None = None,
    admission: Admission | None = None,
):
    async def scenario():
        jobs = manager(url, teachers, admission=admission)
        try:
            inputs = [] if texts is not None or spec.server_path else sequences(seed=3, count=4)
            job = await jobs.submit(spec, inputs, texts or [], user="alice")
            return await last_update(jobs, job.id)
        finally:
            await jobs.close()

    return asyncio.run(scenario())


def provenance(url: str, dataset: str) -> dict:
    return logitcache.open_store(url).dataset(dataset).manifest["provenance"]


def nothing_left(url: str) -> bool:
    store = Path(url)
    return not (store / "datasets").exists() or not any(
        p for p in (store / "datasets").iterdir() if not p.name.startswith(".")
    )


def test_llama2_teacher_refuses_a_commercial_non_llama_student_citing_the_clause(
    registry, tmp_path
):
    url = str(tmp_path / "store")
    with pytest.raises(FailedPrecondition, match=r"§1\.b\.v") as refused:
        run_job(url, registry, JobSpec(dataset="d", teacher="llama", use=COMMERCIAL_QWEN))
    assert "improve any other large language model" in str(refused.value)
    assert nothing_left(url)


def test_an_apache_teacher_is_allowed_and_the_dataset_records_its_provenance(
    registry, demo, tmp_path
):
    url = str(tmp_path / "store")
    done = run_job(url, registry, JobSpec(dataset="d", use=replace(USE, requester="team-a")))
    assert done.state is JobState.COMPLETED, done.error
    p = provenance(url, "d")
    assert p["teacher_name"] == "demo" and p["teacher"] == str(demo.info.path)
    assert p["teacher_fingerprint"] == demo.info.teacher_fingerprint
    assert p["tokenizer_fingerprint"] == demo.info.tokenizer_fingerprint
    assert p["license"] == "apache-2.0" and p["licence"]["source"] == "model card"
    decision = p["policy_decision"]
    assert decision["verdict"] == "allow" and decision["obligations"] == []
    assert decision["student_name"] == "test-student" and decision["purpose"] == "research"
    assert p["requester"] == "team-a" and p["user"] == "alice"
    assert p["filters"]["action"] == "reject" and p["filters"]["texts"] == 4
    assert p["capture"]["k"] == K


def test_a_gemma_teacher_is_allowed_with_its_obligations_recorded(registry, tmp_path):
    url = str(tmp_path / "store")
    done = run_job(url, registry, JobSpec(dataset="d", teacher="gemma", use=COMMERCIAL_QWEN))
    assert done.state is JobState.COMPLETED, done.error
    decision = provenance(url, "d")["policy_decision"]
    assert decision["verdict"] == "allow-with-obligations"
    kinds = {o["kind"] for o in decision["obligations"]}
    assert {"use-restrictions", "licence-copy", "notice"} <= kinds
    assert all("Gemma Terms of Use §3" in o["clause"] for o in decision["obligations"])


def test_no_licence_runs_no_job_until_an_admin_declares_one(registry, tmp_path):
    url = str(tmp_path / "store")
    spec = JobSpec(dataset="d", teacher="unlicensed", use=USE)
    with pytest.raises(FailedPrecondition, match="SetTeacherLicence"):
        run_job(url, registry, spec)
    assert nothing_left(url)
    declarations = tmp_path / "state" / "teacher_licences.json"
    licences = TeacherLicences(path=declarations)
    licences.declare("unlicensed", None, "mit", user="root")
    done = run_job(url, registry, replace(spec), admission=Admission(licences))
    assert done.state is JobState.COMPLETED, done.error
    assert provenance(url, "d")["licence"]["source"] == "admin"
    # The declaration survives a restart; a configured licence is not overridden at run time.
    again = TeacherLicences(path=declarations)
    assert again.declared("unlicensed", None, None).licence.id == "mit"
    with pytest.raises(FailedPrecondition, match="configuration"):
        again.declare("llama", "llama2", "mit")


def test_a_job_must_declare_its_use_and_may_not_name_another_licence(registry, tmp_path):
    url = str(tmp_path / "store")
    with pytest.raises(InvalidArgument, match="declare the use") as missing:
        run_job(url, registry, JobSpec(dataset="d"))
    assert missing.value.fields == ("use",)
    with pytest.raises(InvalidArgument, match="leave license empty"):
        run_job(url, registry, JobSpec(dataset="d", use=USE, license="mit"))
    assert nothing_left(url)


def test_server_path_is_confined_and_a_planted_secret_never_leaks(registry, tmp_path):
    url = str(tmp_path / "store")
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps(SECRET) + "\n")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "link.jsonl").symlink_to(secrets)
    (inputs / "keys.jsonl").write_text(json.dumps(SECRET) + "\n")
    confined = Admission(input_roots=(inputs,))

    def refusal(path: Path, admission: Admission) -> str:
        with pytest.raises((PermissionDenied, InvalidArgument)) as refused:
            run_job(url, registry, JobSpec(dataset="d", use=USE, server_path=str(path)),
                    admission=admission)  # fmt: skip
        return str(refused.value)

    off = refusal(inputs / "keys.jsonl", Admission())
    assert "server_path inputs are off" in off
    outside = refusal(secrets, confined)
    assert outside == refusal(tmp_path / "no-such-file.json", confined)  # existence not told
    assert outside == refusal(inputs / ".." / "secrets.json", confined)
    assert outside == refusal(inputs / "link.jsonl", confined)
    inside = refusal(inputs / "keys.jsonl", confined)  # inside the root, but not usable input
    assert "keys.jsonl:1: missing field" in inside
    for message in (off, outside, inside):
        assert "AKIA" not in message and "918273645" not in message and "api_key" not in message
    assert nothing_left(url)


def test_a_job_reads_server_files_inside_the_allowed_roots(registry, tmp_path):
    url = str(tmp_path / "store")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rows = sequences(seed=8, count=3)
    (inputs / "part.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    spec = JobSpec(dataset="d", use=USE, server_path=str(inputs / "part.jsonl"))
    done = run_job(url, registry, spec, admission=Admission(input_roots=(inputs,)))
    assert done.state is JobState.COMPLETED, done.error
    assert len(logitcache.open_store(url).dataset("d")) == 3


TEXTS = ["the cat sees a dog .", "write to alice@example.com today .", "a dog sees the cat ."]


def test_a_rejecting_filter_names_the_row_and_detector_and_never_the_text(registry, tmp_path):
    url = str(tmp_path / "store")
    with pytest.raises(InvalidArgument, match=r"job input:2 contains sensitive data \(email: 1\)"):
        run_job(url, registry, JobSpec(dataset="d", use=USE), texts=TEXTS)
    assert nothing_left(url)


def test_a_redacting_filter_keeps_findings_out_of_the_cache(registry, demo, tmp_path):
    url = str(tmp_path / "store")
    spec = JobSpec(dataset="d", use=USE, sensitive_data="redact")
    done = run_job(url, registry, spec, texts=TEXTS)
    assert done.state is JobState.COMPLETED, done.error
    stored = logitcache.open_store(url).dataset("d")[1].input_ids
    expected = teacher_tokenize(demo.info)(["write to [REDACTED:email] today ."])[0]
    np.testing.assert_array_equal(stored, expected)
    filters = provenance(url, "d")["filters"]
    assert filters["action"] == "redact" and filters["counts"] == {"email": 1}
    assert filters["texts_with_findings"] == 1 and filters["texts_rejected"] == 0


def test_an_allowing_filter_counts_findings_into_the_provenance(registry, tmp_path):
    url = str(tmp_path / "store")
    done = run_job(url, registry, JobSpec(dataset="d", use=USE, sensitive_data="allow"),
                   texts=TEXTS)  # fmt: skip
    assert done.state is JobState.COMPLETED, done.error
    filters = provenance(url, "d")["filters"]
    assert filters["counts"] == {"email": 1} and filters["texts"] == 3
    with pytest.raises(InvalidArgument, match="sensitive_data must be one of"):
        run_job(url, registry, JobSpec(dataset="e", use=USE, sensitive_data="hide"), texts=TEXTS)


def test_read_through_declares_a_use_and_screens_what_it_computes(registry, demo, tmp_path):
    store = open_store(str(tmp_path / "store"), writable=True)
    clean = sequences(seed=11, count=2)
    secret = teacher_tokenize(demo.info)(["mail alice@example.com now"])[0]
    batch = [np.asarray(s) for s in [*clean, secret]]

    async def scenario() -> None:
        cache = cache_on(store)
        try:
            with pytest.raises(InvalidArgument, match="declare the use"):
                await cache.get(demo, K, batch[:1])
            with pytest.raises(FailedPrecondition, match=r"§1\.b\.v"):
                await cache.get(registry.get("llama"), K, batch[:1], use=COMMERCIAL_QWEN)
            with pytest.raises(InvalidArgument) as refused:
                await cache.get(demo, K, batch, use=USE)
            assert str(refused.value).startswith("sequence 2 contains sensitive data (email: 1)")
            assert "alice" not in str(refused.value)
            _, computed = await cache.get(demo, K, batch[:2], use=USE, user="alice")
            assert computed == 2
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_offline_precompute_records_the_declaration_and_needs_a_licence(demo, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[::2]))
    request = PrecomputeRequest(
        teacher=str(demo.info.path), data=data, out=str(tmp_path / "store"), dataset="d",
        top_k=K, progress=False, use=replace(COMMERCIAL_QWEN, requester="bob"),
    )  # fmt: skip

    def run(req: PrecomputeRequest, info=demo.info):
        return asyncio.run(precompute(req, demo.engine, info=info))

    run(request)
    p = provenance(str(tmp_path / "store"), "d")
    assert p["policy_decision"]["verdict"] == "allow" and p["requester"] == "bob"
    assert p["policy_decision"]["student_family"] == "qwen2" and p["user"]
    with pytest.raises(FailedPrecondition, match="declares no licence"):
        run(replace(request, dataset="e"), info=replace(demo.info, license=None))
    with pytest.raises(FailedPrecondition, match=r"§1\.b\.v"):
        run(replace(request, dataset="f", license="llama2"))


def test_a_job_whose_licence_changed_fails_when_it_runs(registry, tmp_path):
    """The decision is made again when a job starts (after a restart, say), so a licence
    declared since then applies."""
    url = str(tmp_path / "store")
    licences = TeacherLicences()
    licences.declare("unlicensed", None, "apache-2.0")

    async def scenario():
        jobs = manager(url, registry, admission=Admission(licences))
        try:
            spec = JobSpec(dataset="d", teacher="unlicensed", use=COMMERCIAL_QWEN)
            async with jobs._slots:  # hold the job queued while the licence changes
                job = await jobs.submit(spec, sequences(seed=2, count=2), [])
                licences.declare("unlicensed", None, "qwen-research")
            return await last_update(jobs, job.id)
        finally:
            await jobs.close()

    done = asyncio.run(scenario())
    assert done.state is JobState.FAILED and "does not grant commercial use" in done.error
