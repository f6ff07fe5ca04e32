from sllm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeployRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.DeploymentSpec
    def __init__(self, spec: _Optional[_Union[_common_pb2.DeploymentSpec, _Mapping]] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("deployment", "warnings")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    deployment: _common_pb2.Deployment
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deployment: _Optional[_Union[_common_pb2.Deployment, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("model", "auto_scaling_config", "expected_version", "add_lora_adapters", "remove_lora_adapters")
    class AddLoraAdaptersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUTO_SCALING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADD_LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    auto_scaling_config: _common_pb2.AutoScalingConfig
    expected_version: int
    add_lora_adapters: _containers.ScalarMap[str, str]
    remove_lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., auto_scaling_config: _Optional[_Union[_common_pb2.AutoScalingConfig, _Mapping]] = ..., expected_version: _Optional[int] = ..., add_lora_adapters: _Optional[_Mapping[str, str]] = ..., remove_lora_adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("deployment", "warnings")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    deployment: _common_pb2.Deployment
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deployment: _Optional[_Union[_common_pb2.Deployment, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("model", "lora_adapters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., lora_adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: _common_pb2.Deployment
    def __init__(self, deployment: _Optional[_Union[_common_pb2.Deployment, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[_common_pb2.Deployment, _Mapping]]] = ...) -> None: ...
