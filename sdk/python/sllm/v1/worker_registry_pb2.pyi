from google.protobuf import struct_pb2 as _struct_pb2
from sllm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("epoch", "register", "inventory", "ready", "heartbeat", "instance_report", "command_ack")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_REPORT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ACK_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    register: Register
    inventory: Inventory
    ready: WorkerReady
    heartbeat: Heartbeat
    instance_report: InstanceReport
    command_ack: CommandAck
    def __init__(self, epoch: _Optional[int] = ..., register: _Optional[_Union[Register, _Mapping]] = ..., inventory: _Optional[_Union[Inventory, _Mapping]] = ..., ready: _Optional[_Union[WorkerReady, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., instance_report: _Optional[_Union[InstanceReport, _Mapping]] = ..., command_ack: _Optional[_Union[CommandAck, _Mapping]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("node_id", "join_token", "address", "inventory", "agent_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    join_token: str
    address: str
    inventory: Inventory
    agent_version: str
    def __init__(self, node_id: _Optional[str] = ..., join_token: _Optional[str] = ..., address: _Optional[str] = ..., inventory: _Optional[_Union[Inventory, _Mapping]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("gpus", "host_memory_bytes", "checkpoints", "bandwidths", "running", "backends")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTHS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[_common_pb2.Gpu]
    host_memory_bytes: int
    checkpoints: _containers.RepeatedCompositeFieldContainer[_common_pb2.CachedCheckpoint]
    bandwidths: _containers.RepeatedCompositeFieldContainer[_common_pb2.TierBandwidth]
    running: _containers.RepeatedCompositeFieldContainer[RunningInstance]
    backends: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, gpus: _Optional[_Iterable[_Union[_common_pb2.Gpu, _Mapping]]] = ..., host_memory_bytes: _Optional[int] = ..., checkpoints: _Optional[_Iterable[_Union[_common_pb2.CachedCheckpoint, _Mapping]]] = ..., bandwidths: _Optional[_Iterable[_Union[_common_pb2.TierBandwidth, _Mapping]]] = ..., running: _Optional[_Iterable[_Union[RunningInstance, _Mapping]]] = ..., backends: _Optional[_Iterable[str]] = ...) -> None: ...

class RunningInstance(_message.Message):
    __slots__ = ("instance_id", "model", "state", "gpus")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    state: _common_pb2.InstanceState
    gpus: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.InstanceState, str]] = ..., gpus: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerReady(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class InstanceReport(_message.Message):
    __slots__ = ("instance_id", "state", "reason", "load_ms")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    state: _common_pb2.InstanceState
    reason: str
    load_ms: int
    def __init__(self, instance_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.InstanceState, str]] = ..., reason: _Optional[str] = ..., load_ms: _Optional[int] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id", "ok", "error")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    ok: bool
    error: str
    def __init__(self, command_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class RegistryMessage(_message.Message):
    __slots__ = ("registered", "command", "heartbeat_ack", "dispatchers", "placeable")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    DISPATCHERS_FIELD_NUMBER: _ClassVar[int]
    PLACEABLE_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    command: Command
    heartbeat_ack: HeartbeatAck
    dispatchers: Dispatchers
    placeable: Placeable
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., dispatchers: _Optional[_Union[Dispatchers, _Mapping]] = ..., placeable: _Optional[_Union[Placeable, _Mapping]] = ...) -> None: ...

class Placeable(_message.Message):
    __slots__ = ("unknown_instances",)
    UNKNOWN_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    unknown_instances: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, unknown_instances: _Optional[_Iterable[str]] = ...) -> None: ...

class Dispatchers(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, endpoints: _Optional[_Iterable[str]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("worker_id", "epoch", "lease_ms", "heartbeat_interval_ms", "dispatch_endpoints")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    lease_ms: int
    heartbeat_interval_ms: int
    dispatch_endpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., lease_ms: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., dispatch_endpoints: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("seq", "lease_deadline_unix_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    lease_deadline_unix_ms: int
    def __init__(self, seq: _Optional[int] = ..., lease_deadline_unix_ms: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "start", "stop", "drain")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    start: StartInstance
    stop: StopInstance
    drain: DrainInstance
    def __init__(self, command_id: _Optional[str] = ..., start: _Optional[_Union[StartInstance, _Mapping]] = ..., stop: _Optional[_Union[StopInstance, _Mapping]] = ..., drain: _Optional[_Union[DrainInstance, _Mapping]] = ...) -> None: ...

class StartInstance(_message.Message):
    __slots__ = ("instance_id", "model", "backend", "gpus", "backend_config", "traceparent")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    backend: str
    gpus: _containers.RepeatedScalarFieldContainer[int]
    backend_config: _struct_pb2.Struct
    traceparent: str
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., gpus: _Optional[_Iterable[int]] = ..., backend_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class StopInstance(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DrainInstance(_message.Message):
    __slots__ = ("instance_id", "grace_ms")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    grace_ms: int
    def __init__(self, instance_id: _Optional[str] = ..., grace_ms: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[_common_pb2.Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[_common_pb2.Worker, _Mapping]]] = ...) -> None: ...

class GetWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...
