from sllm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetScaleStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListScaleStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListScaleStatusResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ScaleStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ScaleStatus, _Mapping]]] = ...) -> None: ...

class ScaleStatus(_message.Message):
    __slots__ = ("model", "desired", "actual", "demand", "last_decision", "instances", "last_error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    desired: int
    actual: _common_pb2.InstanceCounts
    demand: int
    last_decision: ScalingDecision
    instances: _containers.RepeatedCompositeFieldContainer[_common_pb2.Instance]
    last_error: str
    def __init__(self, model: _Optional[str] = ..., desired: _Optional[int] = ..., actual: _Optional[_Union[_common_pb2.InstanceCounts, _Mapping]] = ..., demand: _Optional[int] = ..., last_decision: _Optional[_Union[ScalingDecision, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[_common_pb2.Instance, _Mapping]]] = ..., last_error: _Optional[str] = ...) -> None: ...

class ScalingDecision(_message.Message):
    __slots__ = ("to", "reason", "at_unix_ms")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    to: int
    reason: str
    at_unix_ms: int
    def __init__(self, to: _Optional[int] = ..., reason: _Optional[str] = ..., at_unix_ms: _Optional[int] = ..., **kwargs) -> None: ...

class GetLeaderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Leader(_message.Message):
    __slots__ = ("holder", "fencing_token", "lease_deadline_unix_ms")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    holder: str
    fencing_token: int
    lease_deadline_unix_ms: int
    def __init__(self, holder: _Optional[str] = ..., fencing_token: _Optional[int] = ..., lease_deadline_unix_ms: _Optional[int] = ...) -> None: ...
