from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeploymentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_STATE_UNSPECIFIED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_ACTIVE: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_DELETING: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_MISSING: _ClassVar[DeploymentState]

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_PENDING: _ClassVar[InstanceState]
    INSTANCE_STATE_LOADING: _ClassVar[InstanceState]
    INSTANCE_STATE_READY: _ClassVar[InstanceState]
    INSTANCE_STATE_DRAINING: _ClassVar[InstanceState]
    INSTANCE_STATE_STOPPED: _ClassVar[InstanceState]
    INSTANCE_STATE_FAILED: _ClassVar[InstanceState]
    INSTANCE_STATE_LOST: _ClassVar[InstanceState]

class CheckpointTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_TIER_UNSPECIFIED: _ClassVar[CheckpointTier]
    CHECKPOINT_TIER_GPU: _ClassVar[CheckpointTier]
    CHECKPOINT_TIER_HOST_MEMORY: _ClassVar[CheckpointTier]
    CHECKPOINT_TIER_DISK: _ClassVar[CheckpointTier]
    CHECKPOINT_TIER_REMOTE: _ClassVar[CheckpointTier]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_INITIALIZING: _ClassVar[WorkerState]
    WORKER_STATE_READY: _ClassVar[WorkerState]
    WORKER_STATE_LOST: _ClassVar[WorkerState]
DEPLOYMENT_STATE_UNSPECIFIED: DeploymentState
DEPLOYMENT_STATE_ACTIVE: DeploymentState
DEPLOYMENT_STATE_DELETING: DeploymentState
DEPLOYMENT_STATE_MISSING: DeploymentState
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_PENDING: InstanceState
INSTANCE_STATE_LOADING: InstanceState
INSTANCE_STATE_READY: InstanceState
INSTANCE_STATE_DRAINING: InstanceState
INSTANCE_STATE_STOPPED: InstanceState
INSTANCE_STATE_FAILED: InstanceState
INSTANCE_STATE_LOST: InstanceState
CHECKPOINT_TIER_UNSPECIFIED: CheckpointTier
CHECKPOINT_TIER_GPU: CheckpointTier
CHECKPOINT_TIER_HOST_MEMORY: CheckpointTier
CHECKPOINT_TIER_DISK: CheckpointTier
CHECKPOINT_TIER_REMOTE: CheckpointTier
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_INITIALIZING: WorkerState
WORKER_STATE_READY: WorkerState
WORKER_STATE_LOST: WorkerState

class AutoScalingConfig(_message.Message):
    __slots__ = ("metric", "target", "min_instances", "max_instances", "keep_alive")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MIN_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    metric: str
    target: float
    min_instances: int
    max_instances: int
    keep_alive: int
    def __init__(self, metric: _Optional[str] = ..., target: _Optional[float] = ..., min_instances: _Optional[int] = ..., max_instances: _Optional[int] = ..., keep_alive: _Optional[int] = ...) -> None: ...

class DeploymentSpec(_message.Message):
    __slots__ = ("model", "backend", "num_gpus", "auto_scaling_config", "backend_config")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    AUTO_SCALING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    BACKEND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: str
    num_gpus: int
    auto_scaling_config: AutoScalingConfig
    backend_config: _struct_pb2.Struct
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[str] = ..., num_gpus: _Optional[int] = ..., auto_scaling_config: _Optional[_Union[AutoScalingConfig, _Mapping]] = ..., backend_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("spec", "state", "version", "created_unix_ms", "updated_unix_ms", "desired_instances", "instances", "last_error")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    state: DeploymentState
    version: int
    created_unix_ms: int
    updated_unix_ms: int
    desired_instances: int
    instances: InstanceCounts
    last_error: str
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., state: _Optional[_Union[DeploymentState, str]] = ..., version: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., desired_instances: _Optional[int] = ..., instances: _Optional[_Union[InstanceCounts, _Mapping]] = ..., last_error: _Optional[str] = ...) -> None: ...

class InstanceCounts(_message.Message):
    __slots__ = ("pending", "loading", "ready", "draining", "lost")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    pending: int
    loading: int
    ready: int
    draining: int
    lost: int
    def __init__(self, pending: _Optional[int] = ..., loading: _Optional[int] = ..., ready: _Optional[int] = ..., draining: _Optional[int] = ..., lost: _Optional[int] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("instance_id", "model", "worker_id", "state", "gpus", "reason", "version", "updated_unix_ms")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    model: str
    worker_id: str
    state: InstanceState
    gpus: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    version: int
    updated_unix_ms: int
    def __init__(self, instance_id: _Optional[str] = ..., model: _Optional[str] = ..., worker_id: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., gpus: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ..., version: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class CachedCheckpoint(_message.Message):
    __slots__ = ("model", "size_bytes", "tier")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    model: str
    size_bytes: int
    tier: CheckpointTier
    def __init__(self, model: _Optional[str] = ..., size_bytes: _Optional[int] = ..., tier: _Optional[_Union[CheckpointTier, str]] = ...) -> None: ...

class TierBandwidth(_message.Message):
    __slots__ = ("tier", "bytes_per_second")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    tier: CheckpointTier
    bytes_per_second: int
    def __init__(self, tier: _Optional[_Union[CheckpointTier, str]] = ..., bytes_per_second: _Optional[int] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "name", "memory_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    memory_bytes: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("worker_id", "epoch", "state", "address", "gpus", "host_memory_bytes", "checkpoints", "bandwidths", "free_gpus", "instance_ids", "lease_deadline_unix_ms", "version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTHS_FIELD_NUMBER: _ClassVar[int]
    FREE_GPUS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    state: WorkerState
    address: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    host_memory_bytes: int
    checkpoints: _containers.RepeatedCompositeFieldContainer[CachedCheckpoint]
    bandwidths: _containers.RepeatedCompositeFieldContainer[TierBandwidth]
    free_gpus: _containers.RepeatedScalarFieldContainer[int]
    instance_ids: _containers.RepeatedScalarFieldContainer[str]
    lease_deadline_unix_ms: int
    version: int
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., state: _Optional[_Union[WorkerState, str]] = ..., address: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., host_memory_bytes: _Optional[int] = ..., checkpoints: _Optional[_Iterable[_Union[CachedCheckpoint, _Mapping]]] = ..., bandwidths: _Optional[_Iterable[_Union[TierBandwidth, _Mapping]]] = ..., free_gpus: _Optional[_Iterable[int]] = ..., instance_ids: _Optional[_Iterable[str]] = ..., lease_deadline_unix_ms: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...
