"""The server's configuration: one typed object, from a file, then environment, then flags.

Precedence, lowest first: defaults, the TOML or JSON file given with ``--config``, environment
variables ``LOGITCACHE_<FIELD>`` (e.g. ``LOGITCACHE_PORT=50052``), command-line flags.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logitcache.client.errors import InvalidArgument
from logitcache.server.engine.capture import MAX_TOP_K
from logitcache.server.engine.protocol import EngineOptions, check_options, parse_engine_args
from logitcache.server.policy.access import check_anonymous_bind
from logitcache.server.policy.guard import GuardAction, GuardPolicy
from logitcache.server.policy.state import Limits

if TYPE_CHECKING:
    from logitcache.server.store.objectstore import S3Settings


@dataclass
class TeacherConfig:
    """One teacher the server runs."""

    name: str  # used in requests
    source: str  # model directory or Hugging Face id
    max_top_k: int = 64  # largest k a request may ask for
    default_top_k: int = 64  # k when a request says 0
    dtype: str = "model"  # "model" = the checkpoint's own dtype
    max_model_len: int | None = None
    kv_cache_gib: float | None = None  # default: 1 GiB on CPUs (VLLM_CPU_KVCACHE_SPACE if set)
    gpu_memory_utilization: float = 0.85  # GPU engine only
    license: str | None = None  # decides the licence policy; default: an admin's, the card's
    # Any other vLLM engine option, by its AsyncEngineArgs name ([teachers.engine_args] table).
    engine_args: dict[str, Any] = field(default_factory=dict)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            max_top_k=self.max_top_k,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            kv_cache_gib=self.kv_cache_gib,
            gpu_memory_utilization=self.gpu_memory_utilization,
            scheduling_priority=True,
            engine_args=self.engine_args,
        )

    def check(self) -> None:
        if not 1 <= self.default_top_k <= self.max_top_k <= MAX_TOP_K:
            raise InvalidArgument(
                f"teacher {self.name!r}: need 1 <= default_top_k <= max_top_k <= {MAX_TOP_K}"
            )
        if not isinstance(self.engine_args, dict):
            raise InvalidArgument(f"teacher {self.name!r}: engine_args must be a table")
        try:
            check_options(self.engine_options())
        except InvalidArgument as e:
            raise InvalidArgument(f"teacher {self.name!r}: {e}") from None


@dataclass
class ServerConfig:
    """Everything ``logitcache serve`` can be told; see ``logitcache serve --help``."""

    store: str = ""  # store URL
    teachers: list[TeacherConfig] = field(default_factory=list)
    host: str = "127.0.0.1"  # bind address of both ports; 0.0.0.0 to serve other machines
    port: int = 50051  # gRPC
    http_port: int = 8080  # health, readiness, metrics
    max_sequences_per_request: int = 4096
    max_tokens_per_request: int = 1 << 21
    max_message_bytes: int = 256 << 20
    max_ids_per_position: int = 256  # ScoreIds: a student's top-k, not the vocabulary
    stream_batch_records: int = 64  # records per StreamDataset batch by default
    stream_prefetch_batches: int = 4  # batches a stream prepares ahead of a slow client
    job_max_in_flight: int = 64  # sequences one job keeps queued in the engine
    max_running_jobs: int = 1
    segment_positions: int = 1 << 16
    flush_seconds: float = 2.0  # read-through results are sealed at least this often
    max_unsealed_bytes: int = 256 << 20  # read-through results held until sealed
    max_job_upload_tokens: int = 1 << 27  # tokens one SubmitJob may stream
    loaded_segment_bytes: int = 2 << 30  # memory for segments held decoded-from-disk
    # How often the server looks for datasets and segments other processes wrote (the bound on
    # how stale a listing is); a read of a record not indexed yet looks at once.
    store_refresh_seconds: float = 5.0
    # s3:// stores: empty settings come from the AWS variables (AWS_ENDPOINT_URL, AWS_REGION,
    # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN).
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    store_index_cache_bytes: int = 64 << 20  # shard indexes of an s3:// store held in memory
    # Records no dataset references (read-through results) are kept under these budgets; 0: none.
    readthrough_retention_bytes: int = 0
    readthrough_retention_age: float = 0.0  # seconds since a segment's last hit
    readthrough_retention_interval: float = 60.0  # seconds between retention passes
    # Where to write {"grpc_port", "http_port", "pid"} once serving (empty: nowhere).
    ready_file: str = ""
    # TLS on both ports (PEM paths; empty: plaintext); a client CA makes gRPC require client certs.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Callers without a token are one local user with every right (loopback binds only).
    allow_anonymous: bool = False
    # Tokens, access lists, quotas, usage and guard flags (default: policy/ inside a local store).
    state_dir: str = ""
    # Shared state of replicas on several hosts: a postgresql:// URL that holds the policy state
    # (in place of state_dir) and the job leases (in place of lease files); empty: neither.
    state_url: str = ""
    audit_dir: str = ""  # default: audit/ in the state directory
    audit_max_bytes: int = 64 << 20  # an audit file rotates at this size
    audit_retention_days: float = 0.0  # rotated audit files older than this are deleted; 0: kept
    # Limits of tokens that have none of their own; 0: unlimited.
    limit_positions_computed_per_day: int = 0
    limit_positions_served_per_day: int = 0
    limit_concurrent_streams: int = 0
    limit_requests_per_second: float = 0.0
    # The extraction guard (see server/policy/guard.py).
    guard_floor: int = GuardPolicy.floor
    guard_owned_ratio: float = GuardPolicy.owned_ratio
    guard_action: str = GuardPolicy.action.value
    guard_throttled_requests_per_second: float = GuardPolicy.throttled_requests_per_second
    # The licence policy and filters (server/policy/admission.py): directories server_path
    # inputs may come from (none: such inputs are refused), the sensitive-data action of datasets
    # and read-through that choose none, and a file of custom licence entries.
    input_roots: list[str] = field(default_factory=list)
    sensitive_data: str = "reject"
    custom_licences: str = ""

    def s3_settings(self) -> S3Settings:
        """How to reach an s3:// store (empty fields: the AWS variables)."""
        from logitcache.server.store.objectstore import S3Settings

        return S3Settings(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id,
            secret_access_key=self.s3_secret_access_key,
            index_cache_bytes=self.store_index_cache_bytes,
        )

    def check(self) -> None:
        if not self.store:
            raise InvalidArgument("no store configured (--store URL)")
        if self.allow_anonymous:
            check_anonymous_bind(self.host)
        self.guard_policy()
        if self.max_ids_per_position < 1:
            raise InvalidArgument(
                f"max_ids_per_position must be at least 1, got {self.max_ids_per_position}"
            )
        for name, value in vars(self.default_limits()).items():
            if value is not None and value < 0:
                raise InvalidArgument(f"limit_{name} must be >= 0 (0: unlimited)")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"teacher names must be unique, got {names}")
        for t in self.teachers:
            t.check()

    def default_limits(self) -> Limits:
        """The limits of tokens without their own (0 in the configuration: none)."""
        return Limits(
            positions_computed_per_day=self.limit_positions_computed_per_day or None,
            positions_served_per_day=self.limit_positions_served_per_day or None,
            concurrent_streams=self.limit_concurrent_streams or None,
            requests_per_second=self.limit_requests_per_second or None,
        )

    def guard_policy(self) -> GuardPolicy:
        try:
            action = GuardAction(self.guard_action.lower())
        except ValueError:
            raise InvalidArgument(
                f"guard_action must be throttle or suspend, not {self.guard_action!r}"
            ) from None
        return GuardPolicy(
            floor=self.guard_floor,
            owned_ratio=self.guard_owned_ratio,
            action=action,
            throttled_requests_per_second=self.guard_throttled_requests_per_second,
        )


FIELD_HELP = {
    "store": "store URL: a directory path or file:// URL (created if missing), or "
    "s3://BUCKET/PREFIX on S3-compatible object storage (the bucket must exist)",
    "host": "address both ports bind to; 0.0.0.0 serves other machines (default: 127.0.0.1)",
    "port": "gRPC port; 0 picks a free one (default: 50051)",
    "http_port": "HTTP port for /healthz, /readyz, /metrics; 0 picks a free one (default: 8080)",
    "max_sequences_per_request": "most sequences in one GetDistributions request (default: 4096)",
    "max_tokens_per_request": "most tokens in one GetDistributions request (default: 2097152)",
    "max_ids_per_position": "most ids one ScoreIds position may ask the teacher to score (a "
    "student's top-k); a request with more is refused with INVALID_ARGUMENT naming this bound; "
    "the ids of a request also count against --max-tokens-per-request (default: 256)",
    "max_message_bytes": "largest gRPC message in either direction; a request message is also "
    "held to what the request limits allow, so a larger one is refused before it is read "
    "(default: 256 MiB)",
    "stream_batch_records": "records per StreamDataset batch when the client says 0 (default: 64)",
    "stream_prefetch_batches": "batches a stream prepares ahead of a slow client (default: 4)",
    "job_max_in_flight": "sequences one job keeps queued in the engine (default: 64)",
    "max_running_jobs": "jobs that run at the same time; others queue (default: 1)",
    "segment_positions": "positions per sealed segment (default: 65536)",
    "flush_seconds": "read-through results are sealed at least this often (default: 2)",
    "max_unsealed_bytes": "memory for read-through results answered and not sealed yet (while "
    "the store refuses writes, they are retried); past it, requests that need a computation "
    "are refused with UNAVAILABLE (default: 256 MiB)",
    "max_job_upload_tokens": "most tokens one SubmitJob may stream, spooled to the store as they "
    "arrive; larger inputs go in a file given with server_path (default: 134217728)",
    "loaded_segment_bytes": "memory for segments held in RAM for streaming (default: 2 GiB)",
    "store_refresh_seconds": "look for datasets and segments written by other processes this "
    "often: listings are at most this old, and a read of a record not yet known looks at once "
    "(default: 5)",
    "s3_endpoint_url": "s3:// stores: the endpoint, e.g. http://127.0.0.1:8333 for SeaweedFS or "
    "MinIO (default: AWS_ENDPOINT_URL, else AWS itself)",
    "s3_region": "s3:// stores: the region (default: AWS_REGION, else us-east-1)",
    "s3_access_key_id": "s3:// stores: the access key (default: AWS_ACCESS_KEY_ID)",
    "s3_secret_access_key": "s3:// stores: the secret key (default: AWS_SECRET_ACCESS_KEY; "
    "prefer the variable or LOGITCACHE_S3_SECRET_ACCESS_KEY to a flag)",
    "store_index_cache_bytes": "s3:// stores: memory for shard indexes read by range, so a "
    "record read costs one request (default: 64 MiB)",
    "readthrough_retention_bytes": "keep at most this many bytes of records no dataset "
    "references (read-through results), evicting least recently used segments (default: 0, "
    "no size bound)",
    "readthrough_retention_age": "evict such records not hit for this many seconds (default: 0, "
    "no age bound)",
    "readthrough_retention_interval": "seconds between retention passes; an evicted segment is "
    "deleted one pass after it was condemned (default: 60)",
    "ready_file": "once serving, write the bound ports and the pid to this file as JSON "
    "(grpc_port, http_port, pid), replaced atomically; how launchers learn ports picked with 0",
    "tls_cert": "PEM certificate chain the server presents: TLS on the gRPC port and HTTPS on the "
    "HTTP port (default: none, plaintext)",
    "tls_key": "PEM private key of --tls-cert (unencrypted)",
    "tls_client_ca": "PEM CA certificates that sign clients' certificates: gRPC callers must "
    "present one (mutual TLS); the HTTP side asks for none, for probes (default: none)",
    "allow_anonymous": "serve callers that send no token as one local user with every right "
    "(single-user mode); accepted only with a loopback --host. Callers that send a token are "
    "still that token's user (default: every call needs a token)",
    "state_dir": "directory of the policy state: tokens (hashes only), access lists, limits, "
    "usage, guard flags, in SQLite (default: policy/ inside a local store; needed for other "
    "stores). `logitcache tokens create --state DIR` makes the first admin's token there",
    "state_url": "shared state of several replicas, postgresql://USER:PASSWORD@HOST:PORT/DB "
    "(any libpq URL): the policy state (instead of --state-dir; quotas then hold across "
    "replicas) and the job leases (instead of lease files in a local store: a job whose "
    "server is lost is resumed by another once its lease expires). Tables are created in "
    "the schema 'logitcache' (default: none; embedded state)",
    "audit_dir": "directory of the hash-chained audit log, one line per call (default: audit/ "
    "in the state directory)",
    "audit_max_bytes": "size at which an audit file is rotated (default: 64 MiB)",
    "audit_retention_days": "delete rotated audit files older than this many days (default: 0, "
    "keep all)",
    "limit_positions_computed_per_day": "positions the teacher computes per token per UTC day, "
    "for tokens without a limit of their own (default: 0, unlimited)",
    "limit_positions_served_per_day": "positions served (streamed or returned) per token per UTC "
    "day (default: 0, unlimited)",
    "limit_concurrent_streams": "streams (StreamDataset, GetDistributions) one token has open at "
    "once (default: 0, unlimited)",
    "limit_requests_per_second": "requests per second per token, a bucket with one second of "
    "burst (default: 0, unlimited)",
    "guard_floor": "the extraction guard flags a token only past this many novel read-through "
    f"positions in a UTC day (default: {GuardPolicy.floor})",
    "guard_owned_ratio": "... and past this many times the positions of the datasets its user "
    f"owns (default: {GuardPolicy.owned_ratio:g})",
    "guard_action": "what a flagged token gets until an admin clears it: throttle (a low request "
    "rate) or suspend (PERMISSION_DENIED) (default: throttle)",
    "guard_throttled_requests_per_second": "request rate of a throttled token (default: "
    f"{GuardPolicy.throttled_requests_per_second:g})",
    "input_roots": "directories a job's server_path may read from, separated by "
    f"{os.pathsep!r} (a TOML list in --config); links and .. that lead out are refused (default: "
    "none, so server_path inputs are refused and jobs stream their input)",
    "sensitive_data": "what happens to inputs in which a sensitive-data detector fires, for "
    "jobs that choose nothing and for read-through: reject (INVALID_ARGUMENT naming the "
    "sequence and detector), redact (job texts: replaced before tokenising) or allow (counted "
    "in the dataset's provenance) (default: reject)",
    "custom_licences": "TOML or YAML file of licence entries added to the built-in catalogue "
    "(the catalogue's schema; an entry with a built-in id replaces it)",
}
TEACHER_FLAG_HELP = {
    "max_top_k": "largest k a request may ask for (default: 64, at most 256)",
    "default_top_k": "k used when a request says 0 (default: 64)",
    "dtype": "engine dtype: model (the checkpoint's), auto, float32, bfloat16, float16",
    "max_model_len": "context length to run the teacher with (default: the model's)",
    "kv_cache_gib": "KV cache size in GiB, any fraction (default on CPUs: "
    "VLLM_CPU_KVCACHE_SPACE if set, else 1; on GPUs: what gpu_memory_utilization leaves)",
    "gpu_memory_utilization": "GPU engine only: fraction of GPU memory for vLLM (default: 0.85)",
    "license": "the teacher's licence, a catalogue id such as apache-2.0 or llama2: the licence "
    "policy decides on it (default: an admin's SetTeacherLicence, else the model card's "
    "license:; with none, the teacher runs no job or read-through)",
    "revision": "hub teachers: branch, tag or commit to fetch (vLLM's revision)",
    "engine_arg": "any vLLM engine option as KEY=VALUE (an AsyncEngineArgs field, e.g. "
    "tensor_parallel_size=2; VALUE read as JSON where it parses); in --config: a "
    "[teachers.engine_args] table",
}
# Teacher flags that set an entry of engine_args rather than a field of their own.
_ENGINE_ARG_FLAGS = ("revision", "engine_arg")


def parse_teacher(spec: str) -> TeacherConfig:
    """``NAME=PATH_OR_ID`` or ``PATH_OR_ID`` (named after its last path component)."""
    name, sep, source = spec.partition("=")
    if not sep:
        source = spec
        name = Path(spec.rstrip("/")).name or spec
    if not name or not source:
        raise InvalidArgument(f"--teacher {spec!r}: expected NAME=PATH_OR_ID or PATH_OR_ID")
    return TeacherConfig(name=name, source=source)


def teachers_from_flags(specs: list[str], flags: dict) -> list[TeacherConfig]:
    """Teachers from ``--teacher`` flags, with ``--max-top-k`` etc. applied to each of them."""
    teachers = []
    for spec in specs:
        t = parse_teacher(spec)
        for name in TEACHER_FLAG_HELP:
            value = flags.get(f"teacher_{name}")
            if value is None:
                continue
            if name in _ENGINE_ARG_FLAGS:
                items = [value] if isinstance(value, str) else list(value)
                given = {"revision": value} if name == "revision" else parse_engine_args(items)
                t.engine_args = {**t.engine_args, **given}
            else:
                setattr(t, name, _coerce(name, value, _TEACHER_TYPES[name]()))
        teachers.append(t)
    return teachers


_TEACHER_TYPES = {
    "max_top_k": int,
    "default_top_k": int,
    "dtype": str,
    "max_model_len": int,
    "kv_cache_gib": float,
    "gpu_memory_utilization": float,
    "license": str,
}


def load_config(path: str | None, overrides: dict) -> ServerConfig:
    """Defaults < file < environment < ``overrides`` (flags that were given)."""
    values: dict = {}
    if path:
        values.update(_read_file(Path(path)))
    for f in fields(ServerConfig):
        env = os.environ.get(f"LOGITCACHE_{f.name.upper()}")
        if env is not None and f.name != "teachers":
            values[f.name] = env
    env_teachers = os.environ.get("LOGITCACHE_TEACHERS")
    if env_teachers:
        values["teachers"] = [parse_teacher(s) for s in env_teachers.split(",") if s]
    values.update({k: v for k, v in overrides.items() if v is not None})
    teachers = [
        t if isinstance(t, TeacherConfig) else _teacher_from_dict(t)
        for t in values.pop("teachers", [])
    ]
    config = ServerConfig(teachers=teachers)
    for f in fields(ServerConfig):
        if f.name in values:
            setattr(config, f.name, _coerce(f.name, values[f.name], getattr(config, f.name)))
    unknown = set(values) - {f.name for f in fields(ServerConfig)}
    if unknown:
        raise InvalidArgument(f"unknown configuration keys: {sorted(unknown)}")
    config.check()
    return config


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise InvalidArgument(f"config file {str(path)!r} does not exist")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"config file {path}: {e}") from None


def _teacher_from_dict(obj: dict) -> TeacherConfig:
    known = {f.name for f in fields(TeacherConfig)}
    unknown = set(obj) - known
    if unknown:
        raise InvalidArgument(f"unknown teacher keys: {sorted(unknown)}")
    if "source" not in obj:
        raise InvalidArgument(f"teacher entry {obj} needs 'source'")
    obj = {"name": Path(str(obj["source"]).rstrip("/")).name, **obj}
    return TeacherConfig(**obj)


def _coerce(name: str, value: object, default: object) -> object:
    if isinstance(default, list) and isinstance(value, str):
        return [part for part in value.split(os.pathsep) if part]
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if isinstance(default, int) and not isinstance(value, int):
        try:
            return int(str(value))
        except ValueError:
            raise InvalidArgument(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(default, float) and not isinstance(value, float):
        try:
            return float(str(value))
        except ValueError:
            raise InvalidArgument(f"{name}: expected a number, got {value!r}") from None
    return value
