from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordBatch(_message.Message):
    __slots__ = ("space_id", "codec", "k", "vocab_size", "keys", "lengths", "input_ids", "indices", "cursor", "arrays", "loss_mask")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    codec: str
    k: int
    vocab_size: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    input_ids: bytes
    indices: _containers.RepeatedScalarFieldContainer[int]
    cursor: int
    arrays: _containers.RepeatedCompositeFieldContainer[EncodedArray]
    loss_mask: bytes
    def __init__(self, space_id: _Optional[str] = ..., codec: _Optional[str] = ..., k: _Optional[int] = ..., vocab_size: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ..., lengths: _Optional[_Iterable[int]] = ..., input_ids: _Optional[bytes] = ..., indices: _Optional[_Iterable[int]] = ..., cursor: _Optional[int] = ..., arrays: _Optional[_Iterable[_Union[EncodedArray, _Mapping]]] = ..., loss_mask: _Optional[bytes] = ...) -> None: ...

class EncodedArray(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("input_ids",)
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, input_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DistributionsRequest(_message.Message):
    __slots__ = ("teacher", "top_k", "sequences", "durable", "use", "mode", "temperatures")
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    USE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    top_k: int
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    durable: bool
    use: UseDeclaration
    mode: str
    temperatures: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, teacher: _Optional[str] = ..., top_k: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., durable: _Optional[bool] = ..., use: _Optional[_Union[UseDeclaration, _Mapping]] = ..., mode: _Optional[str] = ..., temperatures: _Optional[_Iterable[float]] = ...) -> None: ...

class DistributionsResponse(_message.Message):
    __slots__ = ("records", "computed")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_FIELD_NUMBER: _ClassVar[int]
    records: RecordBatch
    computed: int
    def __init__(self, records: _Optional[_Union[RecordBatch, _Mapping]] = ..., computed: _Optional[int] = ...) -> None: ...

class StreamDatasetRequest(_message.Message):
    __slots__ = ("dataset", "rank", "world_size", "seed", "epoch", "start_cursor", "batch_records", "allow_partial", "no_shuffle")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_CURSOR_FIELD_NUMBER: _ClassVar[int]
    BATCH_RECORDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    NO_SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    rank: int
    world_size: int
    seed: int
    epoch: int
    start_cursor: int
    batch_records: int
    allow_partial: bool
    no_shuffle: bool
    def __init__(self, dataset: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., start_cursor: _Optional[int] = ..., batch_records: _Optional[int] = ..., allow_partial: _Optional[bool] = ..., no_shuffle: _Optional[bool] = ...) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("name", "source", "architecture", "vocab_size", "max_sequence_len", "max_top_k", "default_top_k", "engine_dtype", "teacher_fingerprint", "tokenizer_fingerprint", "license", "license_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    ENGINE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    architecture: str
    vocab_size: int
    max_sequence_len: int
    max_top_k: int
    default_top_k: int
    engine_dtype: str
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    license: str
    license_json: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., architecture: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_sequence_len: _Optional[int] = ..., max_top_k: _Optional[int] = ..., default_top_k: _Optional[int] = ..., engine_dtype: _Optional[str] = ..., teacher_fingerprint: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., license: _Optional[str] = ..., license_json: _Optional[str] = ...) -> None: ...

class ListTeachersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTeachersResponse(_message.Message):
    __slots__ = ("teachers", "default_teacher")
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEACHER_FIELD_NUMBER: _ClassVar[int]
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherInfo]
    default_teacher: str
    def __init__(self, teachers: _Optional[_Iterable[_Union[TeacherInfo, _Mapping]]] = ..., default_teacher: _Optional[str] = ...) -> None: ...

class CaptureSpace(_message.Message):
    __slots__ = ("space_id", "teacher_fingerprint", "tokenizer_fingerprint", "vocab_size", "mode", "k", "engine_dtype", "codec", "temperatures")
    SPACE_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    ENGINE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    space_id: str
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    mode: str
    k: int
    engine_dtype: str
    codec: str
    temperatures: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, space_id: _Optional[str] = ..., teacher_fingerprint: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., mode: _Optional[str] = ..., k: _Optional[int] = ..., engine_dtype: _Optional[str] = ..., codec: _Optional[str] = ..., temperatures: _Optional[_Iterable[float]] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "state", "space", "sequences", "positions", "sealed_sequences", "provenance_json", "created_at", "completed_at", "access")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SEALED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    space: CaptureSpace
    sequences: int
    positions: int
    sealed_sequences: int
    provenance_json: str
    created_at: float
    completed_at: float
    access: DatasetAccess
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., space: _Optional[_Union[CaptureSpace, _Mapping]] = ..., sequences: _Optional[int] = ..., positions: _Optional[int] = ..., sealed_sequences: _Optional[int] = ..., provenance_json: _Optional[str] = ..., created_at: _Optional[float] = ..., completed_at: _Optional[float] = ..., access: _Optional[_Union[DatasetAccess, _Mapping]] = ...) -> None: ...

class FinishDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class ResumeDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ("dataset", "cancelled_jobs")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_JOBS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    cancelled_jobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dataset: _Optional[str] = ..., cancelled_jobs: _Optional[_Iterable[str]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class DescribeDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("dataset", "teacher", "top_k", "server_path", "max_len", "overflow", "license", "client_request_id", "use", "sensitive_data", "mode", "temperatures", "messages_field")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SERVER_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USE_FIELD_NUMBER: _ClassVar[int]
    SENSITIVE_DATA_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    teacher: str
    top_k: int
    server_path: str
    max_len: int
    overflow: str
    license: str
    client_request_id: str
    use: UseDeclaration
    sensitive_data: str
    mode: str
    temperatures: _containers.RepeatedScalarFieldContainer[float]
    messages_field: str
    def __init__(self, dataset: _Optional[str] = ..., teacher: _Optional[str] = ..., top_k: _Optional[int] = ..., server_path: _Optional[str] = ..., max_len: _Optional[int] = ..., overflow: _Optional[str] = ..., license: _Optional[str] = ..., client_request_id: _Optional[str] = ..., use: _Optional[_Union[UseDeclaration, _Mapping]] = ..., sensitive_data: _Optional[str] = ..., mode: _Optional[str] = ..., temperatures: _Optional[_Iterable[float]] = ..., messages_field: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "sequence", "text")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    sequence: Sequence
    text: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., sequence: _Optional[_Union[Sequence, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "state", "error", "sequences_total", "sequences_done", "positions_total", "positions_done", "positions_per_second", "eta_seconds", "created_at", "started_at", "finished_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_DONE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_DONE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    state: str
    error: str
    sequences_total: int
    sequences_done: int
    positions_total: int
    positions_done: int
    positions_per_second: float
    eta_seconds: float
    created_at: float
    started_at: float
    finished_at: float
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., sequences_total: _Optional[int] = ..., sequences_done: _Optional[int] = ..., positions_total: _Optional[int] = ..., positions_done: _Optional[int] = ..., positions_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UseDeclaration(_message.Message):
    __slots__ = ("purpose", "student_name", "student_family", "requester", "monthly_active_users")
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    STUDENT_NAME_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FAMILY_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_ACTIVE_USERS_FIELD_NUMBER: _ClassVar[int]
    purpose: str
    student_name: str
    student_family: str
    requester: str
    monthly_active_users: int
    def __init__(self, purpose: _Optional[str] = ..., student_name: _Optional[str] = ..., student_family: _Optional[str] = ..., requester: _Optional[str] = ..., monthly_active_users: _Optional[int] = ...) -> None: ...

class ScoreIdsRequest(_message.Message):
    __slots__ = ("teacher", "sequences", "ids", "use")
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    USE_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    ids: _containers.RepeatedCompositeFieldContainer[IdSets]
    use: UseDeclaration
    def __init__(self, teacher: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., ids: _Optional[_Iterable[_Union[IdSets, _Mapping]]] = ..., use: _Optional[_Union[UseDeclaration, _Mapping]] = ...) -> None: ...

class IdSets(_message.Message):
    __slots__ = ("ids", "counts")
    IDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreIdsResponse(_message.Message):
    __slots__ = ("scores", "stored", "has_stored")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    HAS_STORED_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[Scores]
    stored: RecordBatch
    has_stored: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, scores: _Optional[_Iterable[_Union[Scores, _Mapping]]] = ..., stored: _Optional[_Union[RecordBatch, _Mapping]] = ..., has_stored: _Optional[_Iterable[bool]] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class DatasetAccess(_message.Message):
    __slots__ = ("owner", "users", "groups")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    owner: str
    users: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, owner: _Optional[str] = ..., users: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("positions_computed_per_day", "positions_served_per_day", "concurrent_streams", "requests_per_second")
    POSITIONS_COMPUTED_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_SERVED_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    positions_computed_per_day: int
    positions_served_per_day: int
    concurrent_streams: int
    requests_per_second: float
    def __init__(self, positions_computed_per_day: _Optional[int] = ..., positions_served_per_day: _Optional[int] = ..., concurrent_streams: _Optional[int] = ..., requests_per_second: _Optional[float] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("id", "user", "role", "groups", "created_at", "revoked_at", "limits", "positions_computed_today", "positions_served_today", "flag", "flag_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_COMPUTED_TODAY_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_SERVED_TODAY_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    FLAG_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    user: str
    role: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    created_at: float
    revoked_at: float
    limits: Limits
    positions_computed_today: int
    positions_served_today: int
    flag: str
    flag_reason: str
    def __init__(self, id: _Optional[str] = ..., user: _Optional[str] = ..., role: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., created_at: _Optional[float] = ..., revoked_at: _Optional[float] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., positions_computed_today: _Optional[int] = ..., positions_served_today: _Optional[int] = ..., flag: _Optional[str] = ..., flag_reason: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("user", "role", "groups")
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    user: str
    role: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user: _Optional[str] = ..., role: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("info", "token")
    INFO_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    info: TokenInfo
    token: str
    def __init__(self, info: _Optional[_Union[TokenInfo, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class SetLimitsRequest(_message.Message):
    __slots__ = ("id", "limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    limits: Limits
    def __init__(self, id: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class ClearFlagRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ShareDatasetRequest(_message.Message):
    __slots__ = ("dataset", "add_users", "add_groups", "remove_users", "remove_groups")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ADD_USERS_FIELD_NUMBER: _ClassVar[int]
    ADD_GROUPS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_USERS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    add_users: _containers.RepeatedScalarFieldContainer[str]
    add_groups: _containers.RepeatedScalarFieldContainer[str]
    remove_users: _containers.RepeatedScalarFieldContainer[str]
    remove_groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dataset: _Optional[str] = ..., add_users: _Optional[_Iterable[str]] = ..., add_groups: _Optional[_Iterable[str]] = ..., remove_users: _Optional[_Iterable[str]] = ..., remove_groups: _Optional[_Iterable[str]] = ...) -> None: ...

class SetTeacherLicenceRequest(_message.Message):
    __slots__ = ("teacher", "licence", "custom_json")
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    LICENCE_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_JSON_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    licence: str
    custom_json: str
    def __init__(self, teacher: _Optional[str] = ..., licence: _Optional[str] = ..., custom_json: _Optional[str] = ...) -> None: ...
