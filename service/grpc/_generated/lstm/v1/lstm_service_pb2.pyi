from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Matrix(_message.Message):
    __slots__ = ("rows", "cols", "data")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    data: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., data: _Optional[_Iterable[float]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    inputs: Matrix
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., inputs: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "outputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    outputs: Matrix
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., outputs: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "version", "session_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    session_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model", "version", "steps", "seq", "created_unix", "last_used_unix", "expires_unix", "live_accuracy")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    LIVE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: str
    steps: int
    seq: int
    created_unix: float
    last_used_unix: float
    expires_unix: float
    live_accuracy: LiveAccuracy
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., steps: _Optional[int] = ..., seq: _Optional[int] = ..., created_unix: _Optional[float] = ..., last_used_unix: _Optional[float] = ..., expires_unix: _Optional[float] = ..., live_accuracy: _Optional[_Union[LiveAccuracy, _Mapping]] = ...) -> None: ...

class LiveAccuracy(_message.Message):
    __slots__ = ("scored", "horizons")
    SCORED_FIELD_NUMBER: _ClassVar[int]
    HORIZONS_FIELD_NUMBER: _ClassVar[int]
    scored: bool
    horizons: _containers.RepeatedCompositeFieldContainer[HorizonAccuracy]
    def __init__(self, scored: _Optional[bool] = ..., horizons: _Optional[_Iterable[_Union[HorizonAccuracy, _Mapping]]] = ...) -> None: ...

class HorizonAccuracy(_message.Message):
    __slots__ = ("horizon", "count", "mae", "persistence_mae")
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_MAE_FIELD_NUMBER: _ClassVar[int]
    horizon: int
    count: int
    mae: float
    persistence_mae: float
    def __init__(self, horizon: _Optional[int] = ..., count: _Optional[int] = ..., mae: _Optional[float] = ..., persistence_mae: _Optional[float] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "inputs", "seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    inputs: Matrix
    seq: int
    def __init__(self, session_id: _Optional[str] = ..., inputs: _Optional[_Union[Matrix, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "outputs", "steps", "seq", "replayed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    outputs: Matrix
    steps: int
    seq: int
    replayed: bool
    def __init__(self, session_id: _Optional[str] = ..., outputs: _Optional[_Union[Matrix, _Mapping]] = ..., steps: _Optional[int] = ..., seq: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class PeekRequest(_message.Message):
    __slots__ = ("session_id", "inputs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    inputs: Matrix
    def __init__(self, session_id: _Optional[str] = ..., inputs: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "new_session_id", "scored")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    new_session_id: str
    scored: bool
    def __init__(self, session_id: _Optional[str] = ..., new_session_id: _Optional[str] = ..., scored: _Optional[bool] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionSnapshot(_message.Message):
    __slots__ = ("model", "version", "steps", "seq", "h", "c")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    C_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    steps: int
    seq: int
    h: Matrix
    c: Matrix
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., steps: _Optional[int] = ..., seq: _Optional[int] = ..., h: _Optional[_Union[Matrix, _Mapping]] = ..., c: _Optional[_Union[Matrix, _Mapping]] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("session_id", "snapshot")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    snapshot: SessionSnapshot
    def __init__(self, session_id: _Optional[str] = ..., snapshot: _Optional[_Union[SessionSnapshot, _Mapping]] = ...) -> None: ...

class StepBatchRequest(_message.Message):
    __slots__ = ("steps", "packed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepRequest]
    packed: PackedSteps
    def __init__(self, steps: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ..., packed: _Optional[_Union[PackedSteps, _Mapping]] = ...) -> None: ...

class PackedSteps(_message.Message):
    __slots__ = ("session_ids", "steps", "inputs", "seq")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    steps: int
    inputs: bytes
    seq: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., steps: _Optional[int] = ..., inputs: _Optional[bytes] = ..., seq: _Optional[_Iterable[int]] = ...) -> None: ...

class PackedResults(_message.Message):
    __slots__ = ("steps", "outputs", "data", "total_steps", "seq", "replayed", "failed", "errors")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    outputs: int
    data: bytes
    total_steps: _containers.RepeatedScalarFieldContainer[int]
    seq: _containers.RepeatedScalarFieldContainer[int]
    replayed: _containers.RepeatedScalarFieldContainer[bool]
    failed: _containers.RepeatedScalarFieldContainer[int]
    errors: _containers.RepeatedCompositeFieldContainer[Error]
    def __init__(self, steps: _Optional[int] = ..., outputs: _Optional[int] = ..., data: _Optional[bytes] = ..., total_steps: _Optional[_Iterable[int]] = ..., seq: _Optional[_Iterable[int]] = ..., replayed: _Optional[_Iterable[bool]] = ..., failed: _Optional[_Iterable[int]] = ..., errors: _Optional[_Iterable[_Union[Error, _Mapping]]] = ...) -> None: ...

class StepBatchResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: StepResponse
    error: Error
    def __init__(self, response: _Optional[_Union[StepResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class StepBatchResponse(_message.Message):
    __slots__ = ("results", "packed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepBatchResult]
    packed: PackedResults
    def __init__(self, results: _Optional[_Iterable[_Union[StepBatchResult, _Mapping]]] = ..., packed: _Optional[_Union[PackedResults, _Mapping]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("open", "resume_session_id", "keep", "inputs", "seq", "peek")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PEEK_FIELD_NUMBER: _ClassVar[int]
    open: CreateSessionRequest
    resume_session_id: str
    keep: bool
    inputs: Matrix
    seq: int
    peek: bool
    def __init__(self, open: _Optional[_Union[CreateSessionRequest, _Mapping]] = ..., resume_session_id: _Optional[str] = ..., keep: _Optional[bool] = ..., inputs: _Optional[_Union[Matrix, _Mapping]] = ..., seq: _Optional[int] = ..., peek: _Optional[bool] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("session_id", "outputs", "steps", "seq", "replayed", "error", "session")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    outputs: Matrix
    steps: int
    seq: int
    replayed: bool
    error: Error
    session: SessionInfo
    def __init__(self, session_id: _Optional[str] = ..., outputs: _Optional[_Union[Matrix, _Mapping]] = ..., steps: _Optional[int] = ..., seq: _Optional[int] = ..., replayed: _Optional[bool] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "features", "target", "outputs", "horizon", "hidden_size", "num_layers", "card_json", "live_scoring", "live_scoring_off")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    LIVE_SCORING_FIELD_NUMBER: _ClassVar[int]
    LIVE_SCORING_OFF_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedScalarFieldContainer[str]
    target: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    horizon: int
    hidden_size: int
    num_layers: int
    card_json: str
    live_scoring: bool
    live_scoring_off: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[str]] = ..., target: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., horizon: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., card_json: _Optional[str] = ..., live_scoring: _Optional[bool] = ..., live_scoring_off: _Optional[str] = ...) -> None: ...
