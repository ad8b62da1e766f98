"""Protobuf messages to core objects and back: the only code that knows both.

Request parsing checks what only the wire can get wrong (message order, sizes against the
server's limits); everything else is the core's to check. Messages name request fields.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import numpy as np

from logitcache.client.errors import InvalidArgument, ResourceExhausted
from logitcache.client.wire import encode_batch
from logitcache.server.config import ServerConfig
from logitcache.server.dataset_lifecycle import DatasetEnd
from logitcache.server.jobs import Job, JobSpec
from logitcache.server.policy.decision import Purpose, Student, UseRequest
from logitcache.server.policy.licences import licence_to_json
from logitcache.server.policy.licensing import DeclaredLicence
from logitcache.server.scoring import IdSets, Scored
from logitcache.server.store.read import EncodedBatch
from logitcache.server.streaming import StreamBatch, StreamRequest
from logitcache.server.teachers.registry import Teacher
from logitcache.v1 import logitcache_pb2 as pb


def sequences(
    request: pb.DistributionsRequest | pb.ScoreIdsRequest, config: ServerConfig
) -> list[np.ndarray]:
    """The request's sequences, refused whole if it is over the server's size limits."""
    n = len(request.sequences)
    if n > config.max_sequences_per_request:
        raise ResourceExhausted(
            f"{n} sequences in one request; the limit is "
            f"{config.max_sequences_per_request} (split the request)",
            fields=["sequences"],
        )
    # Counted before anything is converted: a request over the limit costs no memory.
    tokens = sum(len(s.input_ids) for s in request.sequences)
    if tokens > config.max_tokens_per_request:
        raise ResourceExhausted(
            f"{tokens} tokens in one request; the limit is "
            f"{config.max_tokens_per_request} (split the request)",
            fields=["sequences"],
        )
    return [np.asarray(s.input_ids, dtype=np.int64) for s in request.sequences]


def record_batch(batch: EncodedBatch) -> pb.RecordBatch:
    """Encoded records (as the store holds them) in one RecordBatch, in order."""
    space = batch.space
    if not batch.keys:
        return pb.RecordBatch(
            space_id=space.space_id, codec=space.codec, k=space.k, vocab_size=space.vocab_size
        )
    return encode_batch(space, batch.keys, batch.input_ids, batch.lengths, batch.arrays)


def id_sets(request: pb.ScoreIdsRequest, config: ServerConfig) -> list[IdSets]:
    """Per sequence, the ids to score at each of its positions; the ids of one request count
    against the same limit as its tokens (the request's size stays within what the server
    reads, see ``max_request_bytes``)."""
    total = sum(len(s.ids) for s in request.ids)
    if total > config.max_tokens_per_request:
        raise ResourceExhausted(
            f"{total} ids to score in one request; the limit is "
            f"{config.max_tokens_per_request} (split the request)",
            fields=["ids"],
        )
    return [
        IdSets(np.asarray(s.ids, dtype=np.int64), np.asarray(s.counts, dtype=np.int64))
        for s in request.ids
    ]


def scores_response(scored: Scored) -> pb.ScoreIdsResponse:
    return pb.ScoreIdsResponse(
        scores=[pb.Scores(logprobs=lp.tolist()) for lp in scored.logprobs],
        stored=record_batch(scored.stored),
        has_stored=scored.has_stored,
    )


def stream_batch(batch: StreamBatch) -> pb.RecordBatch:
    """One batch of a dataset stream, with its dataset indices and the cursor after it."""
    return encode_batch(
        batch.space,
        batch.keys,
        batch.input_ids,
        batch.lengths,
        batch.arrays,
        indices=batch.indices,
        cursor=batch.cursor,
        loss_mask=batch.loss_mask,
    )


def stream_request(request: pb.StreamDatasetRequest, config: ServerConfig) -> StreamRequest:
    return StreamRequest(
        dataset=request.dataset,
        rank=request.rank,
        world_size=request.world_size or 1,
        seed=request.seed,
        epoch=request.epoch,
        start_cursor=request.start_cursor,
        batch_records=request.batch_records or config.stream_batch_records,
        allow_partial=request.allow_partial,
        shuffle=not request.no_shuffle,
    )


async def job_submission(
    requests: AsyncIterator[pb.SubmitJobRequest],
) -> tuple[JobSpec, AsyncIterator[list[int] | str]]:
    """A SubmitJob stream: its spec (the first message), then its items one by one as they
    arrive (token id lists and texts), so the input is never gathered here."""
    first = await anext(aiter(requests), None)
    if first is None:
        raise InvalidArgument("empty SubmitJob stream: send the job spec first", fields=["spec"])
    if first.WhichOneof("item") != "spec":
        raise InvalidArgument(
            "the first SubmitJob message must carry the job spec", fields=["spec"]
        )

    async def items() -> AsyncIterator[list[int] | str]:
        async for item in requests:
            kind = item.WhichOneof("item")
            if kind == "sequence":
                yield list(item.sequence.input_ids)
            elif kind == "text":
                yield item.text
            else:
                raise InvalidArgument("only the first SubmitJob message may carry a spec")

    return job_spec(first.spec), items()


def use_request(
    message: pb.DistributionsRequest | pb.ScoreIdsRequest | pb.JobSpec,
) -> UseRequest | None:
    """The use a request declares (None: it declares none), for the licence policy; the
    teacher is filled in by the core once it has resolved the default."""
    if not message.HasField("use"):
        return None
    use = message.use
    return UseRequest(
        teacher=message.teacher,
        purpose=Purpose.parse(use.purpose),
        student=Student(use.student_name, use.student_family),
        requester=use.requester,
        monthly_active_users=(
            use.monthly_active_users if use.HasField("monthly_active_users") else None
        ),
    )


def use_message(use: UseRequest | None) -> pb.UseDeclaration | None:
    if use is None:
        return None
    return pb.UseDeclaration(
        purpose=use.purpose.value,
        student_name=use.student.name,
        student_family=use.student.family,
        requester=use.requester,
        monthly_active_users=use.monthly_active_users,
    )


def job_spec(spec: pb.JobSpec) -> JobSpec:
    return JobSpec(
        dataset=spec.dataset,
        teacher=spec.teacher,
        top_k=spec.top_k,
        mode=spec.mode,
        temperatures=list(spec.temperatures),
        server_path=spec.server_path,
        max_len=spec.max_len,
        overflow=spec.overflow or "error",
        license=spec.license,
        client_request_id=spec.client_request_id,
        use=use_request(spec),
        sensitive_data=spec.sensitive_data,
        messages_field=spec.messages_field,
    )


def job_message(job: Job) -> pb.Job:
    fields = asdict(job)
    fields.pop("user")  # recorded in the dataset's provenance, not echoed
    spec = fields["spec"]
    spec["use"] = use_message(job.spec.use)
    fields["spec"] = pb.JobSpec(**spec)
    fields["state"] = str(job.state)
    return pb.Job(**fields)


def dataset_deleted(end: DatasetEnd) -> pb.DeleteDatasetResponse:
    return pb.DeleteDatasetResponse(dataset=end.dataset, cancelled_jobs=end.ended_jobs)


def teacher_info(teacher: Teacher, declared: DeclaredLicence | None = None) -> pb.TeacherInfo:
    """A teacher, with its ``declared`` licence (default: its configuration's or model card's)
    and that licence's catalogue entry."""
    licence = declared.licence if declared is not None else None
    name = declared.name if declared is not None else teacher.license
    return pb.TeacherInfo(
        name=teacher.name,
        source=teacher.config.source,
        architecture=teacher.info.architecture,
        vocab_size=teacher.info.vocab_size,
        max_sequence_len=teacher.engine.max_sequence_len,
        max_top_k=teacher.config.max_top_k,
        default_top_k=teacher.config.default_top_k,
        engine_dtype=teacher.engine.dtype,
        teacher_fingerprint=teacher.info.teacher_fingerprint,
        tokenizer_fingerprint=teacher.info.tokenizer_fingerprint,
        license=name or "",
        license_json=json.dumps(licence_to_json(licence), sort_keys=True) if licence else "",
    )


def dataset_info(d: dict[str, Any]) -> pb.DatasetInfo:
    """One dataset of ``store_summary``."""
    space = {k: v for k, v in d["space"].items() if k in pb.CaptureSpace.DESCRIPTOR.fields_by_name}
    return pb.DatasetInfo(
        name=d["name"],
        state=d["state"],
        space=pb.CaptureSpace(**space),
        sequences=d["sequences"],
        positions=d["positions"],
        sealed_sequences=d["sealed_sequences"],
        provenance_json=json.dumps(d["provenance"], sort_keys=True),
        created_at=d["created_at"],
        completed_at=d["completed_at"] or 0.0,
    )
