"""Dataset precomputation: walk a whole input file through the teacher into sealed segments.

Progress and resume come from the store itself: a record whose key is already sealed is never
computed again, so rerunning an interrupted command (Ctrl-C, kill -9, a crash) continues where it
stopped and ends with the same dataset as an uninterrupted run.

The pipeline keeps the engine busy: up to ``max_in_flight`` sequences are queued in vLLM at all
times, while encoding runs in worker threads and the store's segment writer seals full segments
in its own thread. Reading the input, hashing it and every store operation run off the event
loop too, so a server running a job keeps answering.

One dataset is built by one process at a time: a precompute holds the dataset's lease (see
``leases``) while it runs, and a second precompute of the same dataset, or a server job for it,
is refused with a message naming the holder (its pid and host) rather than computing the same
records twice. Progress counts sealed work only: what a crash would keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import numpy as np

from logitcache.client.codecs import TopKRows
from logitcache.client.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from logitcache.client.space import CaptureMode, CaptureSpace, record_key
from logitcache.server.chat import chat_provenance, chat_renderer
from logitcache.server.engine.capture import CaptureConfig, capture_record, stored_rows
from logitcache.server.engine.columns import CapturedColumns
from logitcache.server.engine.protocol import EngineFactory, EngineOptions, TeacherEngine
from logitcache.server.engine.vllm_engine import VLLMEngine
from logitcache.server.inputs import InputReport, InputSource, describe_input, load_sequences
from logitcache.server.leases import DEFAULT_LEASE_S, busy, dataset_lease, holding, leases_for
from logitcache.server.policy.admission import Admission, Admitted
from logitcache.server.policy.decision import UseRequest
from logitcache.server.policy.filters import (
    FilterAction,
    FilterReport,
    SensitiveDataFilter,
    screen_sequences,
    screening_redact,
    screening_tokenize,
)
from logitcache.server.policy.provenance import policy_provenance
from logitcache.server.spool import Tokenize, teacher_detokenize, teacher_tokenize
from logitcache.server.store.store import Store, open_store, validate_dataset_name
from logitcache.server.store.writer import CapturedRecord, SegmentWriter
from logitcache.server.teachers.identity import TeacherInfo, capture_space, resolve_teacher
from logitcache.server.work_units import UnitProgress, WorkShare, finish

DEFAULT_SEGMENT_POSITIONS = 1 << 16


@dataclass(frozen=True)
class PrecomputeRequest:
    teacher: str
    data: InputSource  # a file, directory or glob of shards, or a store object (a job's input)
    out: str
    dataset: str
    top_k: int  # k for top-k, the most entries for top_p, draws for sampled
    max_len: int | None = None
    overflow: str = "error"
    skip_invalid: bool = False
    segment_positions: int = DEFAULT_SEGMENT_POSITIONS
    max_in_flight: int = 256
    license: str | None = None
    engine: EngineOptions = field(default_factory=EngineOptions)
    progress: bool = True
    mode: CaptureMode = CaptureMode.TOPK  # a mode's string works too; see engine.capture
    top_p: float | None = None
    codec: str | None = None
    temperatures: tuple[float, ...] = ()  # tails stored at these too (see engine.capture)
    text_field: str = "text"
    ids_field: str = "input_ids"
    # Chat rows (``server.chat``): the field of their messages ("": none), and the template
    # that renders them (a shipped name, a Jinja file; None: the teacher tokenizer's own).
    messages_field: str = ""
    chat_template: str | None = None
    # The licence policy and the sensitive-data filter (``server.policy``): the declared use,
    # the dataset's filter action ("": the default), the authenticated user, and what they
    # record in the dataset's provenance (see admitted_inputs).
    use: UseRequest | None = None
    sensitive_data: str = ""
    user: str | None = None
    provenance: dict = field(default_factory=dict)
    # Distributed precompute: the work units this run does (all of them by default), and the
    # shared state (a postgresql:// URL) that holds the leases of workers on several hosts.
    share: WorkShare = field(default_factory=WorkShare)
    state_url: str = ""

    @property
    def capture(self) -> CaptureConfig:
        return CaptureConfig(self.mode, self.top_k, self.top_p, self.codec, self.temperatures)


@dataclass
class PrecomputeResult:
    dataset: str
    sequences: int
    positions: int
    computed_sequences: int
    computed_positions: int
    reused_sequences: int
    segments_written: int
    seconds: float
    report: InputReport
    progress: UnitProgress | None = None  # a distributed precompute's units, after this run

    @property
    def complete(self) -> bool:
        return self.progress is None or self.progress.complete

    @property
    def positions_per_s(self) -> float:
        return self.computed_positions / self.seconds if self.seconds > 0 else 0.0


def prepare_inputs(
    req: PrecomputeRequest,
    info: TeacherInfo,
    tokenize: Tokenize | None = None,
    redact: Callable[[str], str] | None = None,
) -> InputReport:
    """Read and check the input file completely (before any engine starts or anything is written);
    texts are tokenised with ``tokenize`` (default: the teacher's tokenizer), chat messages'
    contents go through ``redact`` (if given) before they are rendered."""
    req.capture  # noqa: B018 - checks the capture options (and k) before any work
    limit = info.max_model_len - 1
    if req.max_len is not None:
        if req.max_len < 1:
            raise InvalidArgument("max_len must be at least 1", fields=["max_len"])
        limit = min(limit, req.max_len)
    return load_sequences(
        req.data,
        vocab_size=info.vocab_size,
        max_len=limit,
        tokenize=tokenize or teacher_tokenize(info),
        overflow=req.overflow,
        skip_invalid=req.skip_invalid,
        text_field=req.text_field,
        ids_field=req.ids_field,
        chat=chat_renderer(info.path, req.messages_field, req.chat_template, redact)
        if req.messages_field
        else None,
    )


def admitted_inputs(
    req: PrecomputeRequest,
    info: TeacherInfo,
    admission: Admission,
    admitted: Admitted | None = None,
) -> tuple[PrecomputeRequest, InputReport]:
    """The policy's decision on ``req`` (made here unless a server's job made it: ``admitted``)
    before anything else, then the input read and screened by the dataset's sensitive-data
    filter. The request returned records both in the dataset's provenance. Offline, the
    teacher's licence is ``req.license`` (the operator's declaration) or its model card's."""
    if admitted is None:
        declared = admission.licence_of(info.name, req.license, info.license)
        user = req.user or getpass.getuser()
        admitted = admission.admit(info.name, declared, req.use, user, use_required=False)
    report, filters = screened_inputs(req, info, admission.filter(req.sensitive_data))
    recorded = {**req.provenance, **policy_provenance(admitted, filters)}
    return replace(req, provenance=recorded), report


def screened_inputs(
    req: PrecomputeRequest, info: TeacherInfo, filter_: SensitiveDataFilter
) -> tuple[InputReport, FilterReport]:
    """The input as ``prepare_inputs`` reads it, texts and chat messages redacted before they
    are tokenised or rendered (a redact filter), and every sequence screened as the teacher's
    tokenizer reads it: a rejected one is INVALID_ARGUMENT naming its row and detector."""
    filters = filter_.report()
    tokenize = teacher_tokenize(info)
    redact = None
    if filter_.action is FilterAction.REDACT:
        tokenize = screening_tokenize(filter_, tokenize, filters)
        redact = screening_redact(filter_, filters)
    report = prepare_inputs(req, info, tokenize, redact)
    sequences = report.sequences
    screen_sequences(
        filter_,
        len(sequences),
        lambda i: sequences[i].input_ids,
        teacher_detokenize(info),
        filters,
        where=lambda i: sequences[i].source,
    )
    return report, filters


def run_precompute(
    req: PrecomputeRequest, engine_factory: EngineFactory = VLLMEngine
) -> PrecomputeResult:
    """Precompute a dataset with an engine of its own (the offline CLI)."""
    return asyncio.run(precompute(req, engine_factory=engine_factory))


async def precompute(
    req: PrecomputeRequest,
    engine: TeacherEngine | None = None,
    *,
    engine_factory: EngineFactory = VLLMEngine,
    store: Store | None = None,
    info: TeacherInfo | None = None,
    priority: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    lease_held: bool = False,
    admission: Admission | None = None,
    admitted: Admitted | None = None,
) -> PrecomputeResult:
    """Precompute a dataset; starts (and stops) an engine from ``engine_factory`` unless one is
    given (vLLM by default; tests pass the reference engine's factory).

    A server passes its own engine, store handle and teacher info, a lower engine priority than
    interactive requests, ``on_progress(sequences_done, positions_done)`` (sealed work), and
    ``lease_held``: its job manager holds the dataset's lease already. Otherwise the run takes
    that lease first, and FailedPrecondition names the process that holds it. ``admission`` is
    the licence policy and filters (default: the built-in catalogue, the default filter);
    ``admitted``, the decision a server's job made at submission.
    """
    validate_dataset_name(req.dataset)
    loop = asyncio.get_running_loop()
    if info is None:
        info = await loop.run_in_executor(
            None, resolve_teacher, req.teacher, req.engine.revision, req.engine.download_dir
        )
    req, report = await loop.run_in_executor(
        None, admitted_inputs, req, info, admission or Admission(), admitted
    )
    if store is None:
        store = await loop.run_in_executor(None, lambda: open_store(req.out, writable=True))
    if lease_held:
        return await _build(req, engine, engine_factory, store, info, report, priority, on_progress)
    async with _holding_share(req, store):
        return await _build(req, engine, engine_factory, store, info, report, priority, on_progress)


async def _build(
    req: PrecomputeRequest,
    engine: TeacherEngine | None,
    engine_factory: EngineFactory,
    store: Store,
    info: TeacherInfo,
    report: InputReport,
    priority: int,
    on_progress: Callable[[int, int], None] | None,
) -> PrecomputeResult:
    loop = asyncio.get_running_loop()
    sequences = [s.input_ids for s in report.sequences]
    found = await loop.run_in_executor(None, _existing_space, store, req, info, sequences)
    existing, complete = found if found is not None else (None, False)
    if complete:
        return await loop.run_in_executor(None, _result, req, store, report, 0, 0, 0, 0.0)
    if existing is not None and req.share.distributed:
        progress = await loop.run_in_executor(None, _share_done, store, req, existing, sequences)
        if progress is not None:  # a retried worker whose units are all sealed: no engine
            return await loop.run_in_executor(
                None, _result, req, store, report, 0, 0, 0, 0.0, progress
            )
    own_engine = engine is None
    if engine is None:
        engine = await loop.run_in_executor(None, engine_factory, info, _engine_options(req))
    try:
        space = capture_space(info, engine.dtype, req.capture)
        if existing is not None and existing != space:
            raise FailedPrecondition(
                f"dataset {req.dataset!r} was started on an engine running {existing.engine_dtype}; "
                f"this engine runs {space.engine_dtype} (pass dtype {existing.engine_dtype})",
                fields=["dtype"],
            )
        todo = await loop.run_in_executor(
            None, _start_dataset, store, req, info, report, space, existing is None
        )
        started = time.perf_counter()
        written = await capture_into_store(
            engine,
            store,
            space,
            todo,
            req.segment_positions,
            req.max_in_flight,
            req.progress,
            priority=priority,
            on_progress=_counting_reused(on_progress, sequences, todo),
        )
        seconds = time.perf_counter() - started
        progress = await loop.run_in_executor(None, _finish, store, req)
        computed_positions = sum(len(s) for _, s in todo)
        return await loop.run_in_executor(
            None, _result, req, store, report, len(todo), computed_positions, written, seconds,
            progress,
        )  # fmt: skip
    finally:
        if own_engine:
            engine.shutdown()


_RERUN = (
    "it is being built; wait for that process to finish, or stop it and rerun this command, "
    "which continues from what it sealed"
)


@contextlib.asynccontextmanager
async def _holding_share(req: PrecomputeRequest, store: Store) -> AsyncIterator[None]:
    """Hold the dataset's lease for the run; a worker of a distributed precompute holds its
    share's lease instead (waiting up to two lease times for a killed predecessor's to expire),
    after checking that no single run or server job holds the whole dataset."""
    loop = asyncio.get_running_loop()
    leases = await loop.run_in_executor(None, leases_for, store, None, req.state_url)
    what = f"dataset {req.dataset!r} in {store.url}"
    if not req.share.distributed:
        async with holding(
            leases, dataset_lease(req.dataset), "logitcache precompute", what=what, todo=_RERUN
        ):
            yield
        return
    whole = await loop.run_in_executor(None, leases.holder, dataset_lease(req.dataset))
    if whole is not None:
        raise FailedPrecondition(busy(what, whole, "wait for it to finish"))
    share = req.share
    async with holding(
        leases, share.lease(req.dataset),
        f"logitcache precompute worker {share.worker} of {share.workers}",
        what=f"worker {share.worker} of {share.workers} of {what}", todo=_RERUN,
        wait_s=2 * DEFAULT_LEASE_S,
    ):  # fmt: skip
        yield


def _share_done(
    store: Store, req: PrecomputeRequest, space: CaptureSpace, sequences: list[np.ndarray]
) -> UnitProgress | None:
    """The dataset's progress, finished, if every sequence of this worker's share is sealed
    already (a retry after its last seal); None while it has work."""
    keys = [record_key(space.space_id, s) for s in sequences]
    store.refresh()
    if _missing(store, *req.share.select(keys, sequences)):
        return None
    return finish(store, req.dataset)


def _finish(store: Store, req: PrecomputeRequest) -> UnitProgress | None:
    """After a run sealed its share: the dataset is complete (one worker), or complete once
    every worker's units are sealed, which the last of them to finish sees."""
    if not req.share.distributed:
        store.mark_complete(req.dataset)
        return None
    return finish(store, req.dataset)


def _check_created_alike(
    store: Store,
    req: PrecomputeRequest,
    info: TeacherInfo,
    sequences: list[np.ndarray],
    space: CaptureSpace,
) -> None:
    """Another worker published the dataset first: it must be this very one."""
    found = _existing_space(store, req, info, sequences)
    if found is None or found[0] != space:
        raise FailedPrecondition(
            f"dataset {req.dataset!r} in {store.url} was published by another worker with "
            "another capture space (engine dtype); run every worker with the same options",
            fields=["dtype"],
        )


def _start_dataset(
    store: Store,
    req: PrecomputeRequest,
    info: TeacherInfo,
    report: InputReport,
    space: CaptureSpace,
    create: bool,
) -> list[tuple[bytes, np.ndarray]]:
    """Create the dataset unless it exists, clean dead writers' leftovers; what is left to do
    (of this run's share of the work units)."""
    sequences = [s.input_ids for s in report.sequences]
    keys = [record_key(space.space_id, s) for s in sequences]
    if create:
        try:
            create_dataset(store, req, info, report, space)
        except AlreadyExists:
            if not req.share.distributed:
                raise
            _check_created_alike(store, req, info, sequences, space)  # by another worker
    elif store.dataset(req.dataset).manifest["state"] == "partial":
        store.mark_state(req.dataset, "building")  # finished as partial, and now resumed
    store.clean_unsealed()
    return _missing(store, *req.share.select(keys, sequences))


def create_dataset(
    store: Store,
    req: PrecomputeRequest,
    info: TeacherInfo,
    report: InputReport,
    space: CaptureSpace,
    *,
    job: dict[str, str] | None = None,
) -> None:
    """Publish the dataset of ``req`` (state building) with its whole key list, create-only:
    AlreadyExists if the name is taken. ``job`` (its id and client request id) goes into the
    provenance of a dataset that a server's job builds."""
    sequences = [s.input_ids for s in report.sequences]
    provenance = _provenance(req, info, report)
    if job is not None:
        provenance["job"] = job
    if req.share.distributed:
        provenance["work_units"] = req.share.to_json()
    store.create_dataset(
        req.dataset,
        space,
        [record_key(space.space_id, s) for s in sequences],
        positions=sum(len(s) for s in sequences),
        provenance=provenance,
        loss_masks=report.loss_masks,
    )


async def capture_into_store(
    engine: TeacherEngine,
    store: Store,
    space: CaptureSpace,
    todo: list[tuple[bytes, np.ndarray]],
    segment_positions: int,
    max_in_flight: int,
    progress: bool,
    *,
    priority: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Capture ``todo`` (key, ids) pairs and seal them into segments; returns segments written.

    Engine work is bounded by ``max_in_flight`` queued sequences; at most two full segments wait
    for the writer thread, so memory stays bounded when storage is slower than the engine.
    ``on_progress(sequences_done, positions_done)`` is called after every sealed segment: it
    counts only what is in the store.
    """
    from tqdm import tqdm

    bar = tqdm(
        total=sum(len(s) for _, s in todo),
        unit="pos",
        unit_scale=True,
        desc="capture",
        disable=not progress,
        smoothing=0.1,
    )
    slots = asyncio.Semaphore(max_in_flight)
    loop = asyncio.get_running_loop()
    config = CaptureConfig.of_space(space)

    def encode(key: bytes, ids: np.ndarray, answer: TopKRows | CapturedColumns) -> CapturedRecord:
        return CapturedRecord.encode(key, ids, stored_rows(config, answer), space)

    async def one(key: bytes, ids: np.ndarray) -> CapturedRecord:
        try:
            answer = await capture_record(engine, config, ids, key, priority)
        finally:
            slots.release()
        return await loop.run_in_executor(None, encode, key, ids, answer)

    sealed_sequences = sealed_positions = 0

    def sealed(records: list[CapturedRecord]) -> None:
        nonlocal sealed_sequences, sealed_positions
        sealed_sequences += len(records)
        sealed_positions += sum(len(r) for r in records)
        if on_progress is not None:
            on_progress(sealed_sequences, sealed_positions)

    writer = SegmentWriter(store, segment_positions=segment_positions, on_sealed=sealed)
    tasks: set[asyncio.Task] = set()

    async def collect(record: CapturedRecord) -> None:
        await writer.add(space, record)
        bar.update(len(record))

    try:
        for key, ids in todo:
            await slots.acquire()
            tasks.add(asyncio.create_task(one(key, ids)))
            for task in [t for t in tasks if t.done()]:
                tasks.discard(task)
                await collect(task.result())
        for finished in asyncio.as_completed(tasks):
            await collect(await finished)
        tasks.clear()
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
        await writer.close()  # seals what was captured, also when stopped: resume keeps it
    return writer.segments_written


def _counting_reused(
    on_progress: Callable[[int, int], None] | None,
    sequences: list[np.ndarray],
    todo: list[tuple[bytes, np.ndarray]],
) -> Callable[[int, int], None] | None:
    """Report dataset-level progress: what was sealed before (or is a duplicate) counts as done."""
    if on_progress is None:
        return None
    base_sequences = len(sequences) - len(todo)
    base_positions = sum(len(s) for s in sequences) - sum(len(s) for _, s in todo)
    return lambda s, p: on_progress(base_sequences + s, base_positions + p)


def _missing(
    store: Store, keys: list[bytes], sequences: list[np.ndarray]
) -> list[tuple[bytes, np.ndarray]]:
    """Unique (key, ids) pairs not sealed yet, in dataset order."""
    seen: set[bytes] = set()
    todo = []
    for key, ids in zip(keys, sequences, strict=True):
        if key not in seen and not store.contains(key):
            seen.add(key)
            todo.append((key, ids))
    return todo


def _existing_space(
    store: Store, req: PrecomputeRequest, info: TeacherInfo, sequences: list[np.ndarray]
) -> tuple[CaptureSpace, bool] | None:
    """The capture space of an existing dataset of this name, and whether it is complete.

    AlreadyExists unless it was started by this same request (same capture, same sequences).
    """
    if req.dataset not in store.datasets():
        return None
    ds = store.dataset(req.dataset)
    space = ds.space
    same = (
        space.teacher_fingerprint == info.teacher_fingerprint
        and info.tokenizer_matches(space.tokenizer_fingerprint)
        and space.k == req.top_k
        and space.mode == req.capture.space_mode
        and space.codec == req.capture.codec_name
        and space.temperatures == req.capture.temperatures
    )
    if not same:
        hint = "choose another name"
        if req.codec is None and space.codec != req.capture.codec_name:
            hint += f" (or pass codec {space.codec} to continue it)"
        raise AlreadyExists(
            f"dataset {req.dataset!r} exists in {store.url} with another teacher, tokenizer or "
            f"capture (mode {space.mode}, k={space.k}, encoded with {space.codec}); {hint}",
            fields=["codec"],
        )
    if ds.keys != [record_key(space.space_id, s).hex() for s in sequences]:
        raise AlreadyExists(
            f"dataset {req.dataset!r} exists in {store.url} with different sequences; "
            "choose another name"
        )
    return space, ds.complete


def _engine_options(req: PrecomputeRequest) -> EngineOptions:
    opts = req.engine
    if req.capture.mode == "sampled":  # draws are made engine-side: no top-k, no full vocabulary
        return opts
    if opts.max_top_k < req.top_k:
        opts = EngineOptions(**{**opts.__dict__, "max_top_k": req.top_k})
    return opts


def _provenance(req: PrecomputeRequest, info: TeacherInfo, report: InputReport) -> dict:
    return {
        "teacher": info.name,
        "teacher_architecture": info.architecture,
        "teacher_fingerprint": info.teacher_fingerprint,
        "tokenizer_fingerprint": info.tokenizer_fingerprint,
        "chat_template_fingerprint": info.chat_template_fingerprint,
        "revision": info.revision,
        "license": req.license or info.license,
        "policy_decision": None,
        "requester": getpass.getuser(),
        "source": {
            **describe_input(req.data),  # path, sha256 and each shard's path, size and sha256
            "text_field": req.text_field,
            "ids_field": req.ids_field,
            "skipped_rows": dict(report.skipped),
            "truncated_rows": report.truncated,
            "split_rows": report.split,
            "overflow": req.overflow,
            "max_len": req.max_len,
        },
        **chat_provenance(report.loss_masks),  # the template's name and sha256, the mask's origin
        "capture": {
            "mode": req.capture.space_mode,
            "k": req.top_k,
            "codec": req.capture.codec_name,
            "tool": "logitcache precompute",
        },
        **req.provenance,
    }


def _result(
    req, store, report, computed, computed_positions, written, seconds, progress=None
) -> PrecomputeResult:
    ds = store.dataset(req.dataset)
    return PrecomputeResult(
        dataset=req.dataset,
        sequences=len(ds),
        positions=ds.positions,
        computed_sequences=computed,
        computed_positions=computed_positions,
        reused_sequences=len(set(ds.keys)) - computed,
        segments_written=written,
        seconds=seconds,
        report=report,
        progress=progress,
    )
