"""The client commands of ``logitcache``: submit, jobs, fetch (talking to a running server).

``add_commands(sub)`` registers them on the root parser's subcommands; ``logitcache.cli`` maps
what they raise to one line on stderr and an exit status: a bad input file is an
:class:`~logitcache.client.errors.InvalidArgument` naming ``file:line`` (exit 2), a server error
keeps its status code (exit 2), and a followed job that ends failed or cancelled is
:class:`JobNotCompleted` (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from logitcache.client.errors import InvalidArgument
from logitcache.client.options import (
    add_dataset_options,
    add_mode_option,
    add_progress_option,
    add_server_options,
    add_temperatures_option,
    add_use_options,
    client_arguments,
    use_of,
)


class JobNotCompleted(Exception):
    """A job the command followed ended failed or cancelled; the message says which and why."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``jobs`` and ``fetch`` to the ``logitcache`` subcommands."""
    p = sub.add_parser(
        "submit",
        help="submit a precompute job to a server (texts or token ids, or a file on the server)",
        description=(
            "Build a dataset in the server's store with the server's teacher. --data streams a "
            'local JSONL file whose rows are all {"text": ...} (tokenised by the server with the '
            'teacher\'s tokenizer) or all {"input_ids": [...]}; the file is checked first and a '
            "bad row stops with file:line. --server-path names a JSONL or Parquet file the server "
            "reads itself (for inputs too large to stream). Prints the job id; --wait then "
            "follows the job to its end."
        ),
    )
    add_server_options(p, timeout=600.0)
    add_dataset_options(
        p, license_default="the teacher's, which the server declares; another is refused"
    )
    add_use_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, metavar="FILE.jsonl", help="local JSONL file to send")
    src.add_argument("--server-path", metavar="PATH", help="JSONL or Parquet file on the server")
    p.add_argument("--teacher", default=None, help="teacher name (default: the server's default)")
    p.add_argument("--top-k", type=int, default=None, help="entries per position (default: the teacher's)")  # fmt: skip
    add_mode_option(p)
    add_temperatures_option(p)
    p.add_argument(
        "--messages-field",
        default=None,
        metavar="FIELD",
        help="--server-path rows with this field are chat conversations, rendered with the "
        "teacher's chat template, each sequence with an assistant-only loss mask",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job to its end (progress bar on a terminal); exit 1 if it fails",
    )
    add_progress_option(p)
    p.set_defaults(handler=_submit)

    p = sub.add_parser(
        "jobs",
        help="list a server's jobs, or show, watch or cancel one",
        description=(
            "Without JOB_ID: a table of all jobs, newest first (id, dataset, state, progress, "
            "rate, ETA). With JOB_ID: the job's details; --watch follows it to its end (progress "
            "bar on a terminal; exit 1 if it fails or is cancelled); --cancel stops it (sealed "
            "work stays in the store)."
        ),
    )
    add_server_options(p)
    p.add_argument(
        "job_id", metavar="JOB_ID", nargs="?", default=None, help="a job id (default: all jobs)"
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--watch", action="store_true", help="follow JOB_ID until it ends")
    action.add_argument("--cancel", action="store_true", help="cancel JOB_ID")
    add_progress_option(p)
    p.set_defaults(handler=_jobs)

    p = sub.add_parser(
        "fetch",
        help="read-through: get the teacher's distributions for token sequences into an .npz",
        description=(
            'Send the {"input_ids": [...]} rows of a JSONL file to the server (cached sequences '
            "come from its store, the others are computed) and write the records to an .npz "
            "file: input_ids int32 [P], token_ids int32 [P, k], logprobs float32 [P, k] and "
            "target_logprobs float32 [P] (NaN on each record's last row) and, for spaces that "
            "store it, tail_logprobs float32 [P] (log of the mass outside the top-k), and for "
            "--mode sampled counts int32 [P, k] (draws per entry), and with --temperatures "
            "tempered_log_tails float32 [P, m] (column j: log of the mass outside the row's "
            "entries at temperatures[j]) and temperatures float32 [m], concatenated over the "
            "records in file order (k is the widest record's; narrower rows are padded with id 0, "
            "log-prob -inf, count 0), with offsets int64 [n+1] (record i is rows "
            "offsets[i]:offsets[i+1]) and keys (hex) [n]. The client has no tokenizer: for texts, "
            "build a dataset with `logitcache submit`. Writing into a store (--out-store) is not "
            "implemented; only --out."
        ),
    )
    add_server_options(p)
    p.add_argument("--data", type=Path, required=True, metavar="FILE.jsonl", help="input rows")
    p.add_argument("--out", type=Path, required=True, metavar="OUT.npz", help="output file")
    p.add_argument("--teacher", default=None, help="teacher name (default: the server's default)")
    p.add_argument("--top-k", type=int, default=None, help="entries per position (default: the server's)")  # fmt: skip
    add_mode_option(p)
    add_temperatures_option(p)
    p.add_argument("--batch", type=int, default=256, help="sequences per request (default: 256)")
    add_use_options(p)
    add_progress_option(p)
    p.set_defaults(handler=_fetch)


def _client(args: argparse.Namespace) -> Any:
    from logitcache.client.client import Client

    return Client(args.server, **client_arguments(args))


def _follow(client: Any, job_id: str, args: argparse.Namespace) -> Any:
    """Wait for the job to end; the final job if it completed."""
    try:
        return client.wait(job_id, progress=False if args.no_progress else None)
    except RuntimeError as e:  # Client.wait: the job failed or was cancelled
        raise JobNotCompleted(str(e)) from None


# ---- submit ---------------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    rows = _JsonlRows(args.data) if args.data else None
    with _client(args) as client:
        job_id = client.precompute(
            args.dataset,
            texts=rows if rows and rows.kind == "text" else None,
            input_ids=rows if rows and rows.kind == "input_ids" else None,
            server_path=args.server_path,
            teacher=args.teacher,
            top_k=args.top_k,
            max_len=args.max_len,
            overflow=args.overflow,
            license=args.license,
            use=use_of(args),
            sensitive_data=args.sensitive_data,
            messages_field=args.messages_field,
            mode=args.mode,
            temperatures=args.temperatures,
        )
        print(job_id, flush=True)
        if args.wait:
            print(_job_summary(_follow(client, job_id, args)))
    return 0


class _JsonlRows:
    """The rows of a JSONL file: all texts or all token id lists, checked when opened.

    Iterating reads the file again (so a retried submission can resend it) and yields each row's
    text or id list.
    """

    def __init__(self, path: Path, *, texts_allowed: bool = True) -> None:
        self.path = path
        self.kind: str | None = None
        self.count = 0
        for _ in self._rows(check=True, texts_allowed=texts_allowed):
            self.count += 1
        if self.count == 0:
            raise InvalidArgument(f"{path}: no rows")

    def __iter__(self) -> Iterator:
        return self._rows(check=False)

    def __len__(self) -> int:
        return self.count

    def _rows(self, *, check: bool, texts_allowed: bool = True) -> Iterator:
        try:
            f = open(self.path, encoding="utf-8")
        except OSError as e:
            raise InvalidArgument(f"{self.path}: {e.strerror}") from None
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line.rstrip())
                except json.JSONDecodeError as e:
                    raise InvalidArgument(
                        f"{where}: bad JSON: {e.msg} (column {e.colno})"
                    ) from None
                if check:
                    self._check(row, where, texts_allowed)
                yield row[self.kind]

    def _check(self, row: object, where: str, texts_allowed: bool) -> None:
        fields = row if isinstance(row, dict) else {}
        kind = next((k for k in ("text", "input_ids") if k in fields), None)
        if kind is None:
            raise InvalidArgument(f'{where}: expected an object with "text" or "input_ids"')
        if self.kind is not None and kind != self.kind:
            raise InvalidArgument(
                f'{where}: a "{kind}" row in a file of "{self.kind}" rows; use one kind per file'
            )
        self.kind = kind
        value = fields[kind]
        if kind == "text":
            if not texts_allowed:
                raise InvalidArgument(
                    f"{where}: a text row, but the client has no tokenizer: give token ids "
                    '({"input_ids": [...]}) or build a dataset from texts with `logitcache submit`'
                )
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f'{where}: "text" must be a non-empty string')
        elif not (
            isinstance(value, list)
            and value
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
        ):
            raise InvalidArgument(f'{where}: "input_ids" must be a non-empty list of token ids (ints >= 0)')  # fmt: skip


# ---- jobs -----------------------------------------------------------------------------------


def _jobs(args: argparse.Namespace) -> int:
    if (args.watch or args.cancel) and not args.job_id:
        raise InvalidArgument("--watch and --cancel need a JOB_ID")
    with _client(args) as client:
        if args.job_id is None:
            print(_jobs_table(client.list_jobs()))
        elif args.cancel:
            print(_job_summary(client.cancel_job(args.job_id)))
        elif args.watch:
            print(_job_summary(_follow(client, args.job_id, args)))
        else:
            print(_job_details(client.get_job(args.job_id)))
    return 0


def _jobs_table(jobs: list[Any]) -> str:
    if not jobs:
        return "no jobs"
    rows = [("ID", "DATASET", "STATE", "PROGRESS", "RATE", "ETA")]
    for j in jobs:
        running = j.state == "running"
        rows.append(
            (
                j.id,
                j.spec.dataset,
                j.state,
                _percent(j),
                f"{_si(_rate(j))} pos/s" if _rate(j) else "-",
                _duration(j.eta_seconds) if running and j.eta_seconds > 0 else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _job_details(job: Any) -> str:
    s = job.spec
    lines = [
        ("job", job.id),
        ("dataset", s.dataset),
        ("state", job.state + (f": {job.error}" if job.error else "")),
        ("teacher", f"{s.teacher} ({s.mode or 'topk'}, top_k {s.top_k}{_temperatures(s)})"),
        ("input", s.server_path or "streamed by the client"),
        ("sequences", f"{job.sequences_done:,} / {job.sequences_total:,}"),
        ("positions", f"{job.positions_done:,} / {job.positions_total:,} ({_percent(job)})"),
        ("rate", f"{_si(_rate(job))} positions/s" if _rate(job) else "-"),
        ("eta", _duration(job.eta_seconds) if job.state == "running" else "-"),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
    ]
    return "\n".join(f"{k + ':':11}{v}" for k, v in lines)


def _temperatures(spec: Any) -> str:
    """The job details' ", temperatures 2,4" of a job that stores tails at them; "" if none."""
    values = ",".join(f"{t:g}" for t in spec.temperatures)
    return f", temperatures {values}" if values else ""


def _job_summary(job: Any) -> str:
    took = job.finished_at - job.started_at if job.finished_at and job.started_at else 0.0
    return (
        f"job {job.id} {job.state}: dataset {job.spec.dataset}, {job.sequences_done:,} of "
        f"{job.sequences_total:,} sequences, {job.positions_done:,} of {job.positions_total:,} "
        f"positions" + (f" in {took:.1f} s" if took else "")
    )


def _percent(job: Any) -> str:
    if job.state == "completed":
        return "100.0%"
    return f"{100 * job.positions_done / job.positions_total:.1f}%" if job.positions_total else "-"


def _rate(job: Any) -> float:
    """Recent rate of a running job; the average rate of an ended one."""
    if job.state == "running":
        return job.positions_per_second
    took = job.finished_at - job.started_at if job.finished_at and job.started_at else 0.0
    return job.positions_done / took if took > 0 else 0.0


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


# ---- fetch ----------------------------------------------------------------------------------


def _fetch(args: argparse.Namespace) -> int:
    import numpy as np

    if args.batch < 1:
        raise InvalidArgument("--batch must be at least 1")
    sequences = list(_JsonlRows(args.data, texts_allowed=False))
    batches = (sequences[i : i + args.batch] for i in range(0, len(sequences), args.batch))
    records = []
    with _client(args) as client, _progress(len(sequences), args.no_progress) as bar:
        for batch in client.get_distributions_iter(
            batches, teacher=args.teacher, top_k=args.top_k, use=use_of(args), mode=args.mode,
            temperatures=args.temperatures,
        ):  # fmt: skip
            records += batch
            bar.update(len(batch))
    lengths = np.asarray([len(r) for r in records], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:  # a file object: np.savez would append ".npz" to a path
        np.savez(
            f,
            input_ids=np.concatenate([r.input_ids for r in records]),
            token_ids=_columns([r.token_ids for r in records], 0),
            logprobs=_columns([r.logprobs for r in records], -np.inf),
            target_logprobs=np.concatenate([r.target_logprobs for r in records]),
            **(
                {"tail_logprobs": np.concatenate([r.tail_logprobs for r in records])}
                if all(r.tail_logprobs is not None for r in records)
                else {}
            ),
            **(
                {"counts": _columns([r.counts for r in records], 0)}
                if all(r.counts is not None for r in records)
                else {}
            ),
            **_tempered_columns(records),
            offsets=offsets,
            keys=np.asarray([r.key for r in records]),
        )
    print(
        f"wrote {len(records):,} records ({int(offsets[-1]):,} positions, k={records[0].k}) "
        f"to {args.out}"
    )
    return 0


def _tempered_columns(records: list[Any]) -> dict[str, Any]:
    """``tempered_log_tails`` [P, m] and ``temperatures`` [m] where the records carry tails at
    temperatures (one capture space: the same temperatures in every record), else none."""
    import numpy as np

    if not all(r.tempered_log_tails is not None for r in records):
        return {}
    return {
        "tempered_log_tails": np.concatenate([r.tempered_log_tails for r in records]),
        "temperatures": np.asarray(records[0].temperatures, dtype=np.float32),
    }


def _columns(arrays: list[Any], fill: float) -> Any:
    """Records' [T, k] rows stacked into [P, k] at the widest k (top-p and sampled records have
    their own widths), the narrower ones padded with ``fill``."""
    import numpy as np

    width = max(a.shape[1] for a in arrays)
    return np.concatenate(
        [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays]
    )


def _progress(total: int, hidden: bool):
    from tqdm import tqdm

    disable = hidden or not sys.stderr.isatty()
    return tqdm(total=total, unit="seq", disable=disable, file=sys.stderr)
