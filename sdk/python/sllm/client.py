"""The hand-written client over sllm's generated gRPC stubs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, List, Optional, Sequence, Tuple, Union

import grpc
from google.protobuf import json_format, struct_pb2

from sllm.v1 import (
    common_pb2,
    dispatch_pb2,
    dispatch_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
    scaler_pb2,
    scaler_pb2_grpc,
    worker_registry_pb2,
    worker_registry_pb2_grpc,
)


class SllmError(Exception):
    """A call sllm refused or could not serve: the gRPC status code and sllm's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Chunk:
    """Generated text."""

    text: str
    tokens: int
    # With logprobs=True: (token, logprob, [(alternative, logprob), ...]) per generated token.
    logprobs: tuple = ()


@dataclass(frozen=True)
class Progress:
    """Where a request held for a cold model stands (queued, starting, loading, routed)."""

    stage: str
    message: str
    worker_id: str
    instance_id: str


@dataclass(frozen=True)
class Finished:
    """The end of a generation."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float
    queue_ms: float
    instance_id: str


Event = Union[Chunk, Progress, Finished]
Messages = Sequence[dict]


def _target(endpoint: str) -> str:
    for prefix in ("http://", "https://", "grpc://"):
        if endpoint.startswith(prefix):
            return endpoint[len(prefix) :]
    return endpoint


def _read(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _credentials(
    endpoint: str, ca: Optional[str], cert: Optional[str], key: Optional[str]
) -> Optional[grpc.ChannelCredentials]:
    """TLS credentials for an https:// endpoint (or when any TLS file is given); None for plain
    text. `ca` defaults to the system roots; `cert` and `key` are for mutual TLS."""
    if not endpoint.startswith("https://") and ca is None and cert is None:
        return None
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def _spec(
    model: str,
    backend: str,
    num_gpus: int,
    min_instances: int,
    max_instances: int,
    target: float,
    keep_alive: int,
    backend_config: Optional[dict],
) -> common_pb2.DeploymentSpec:
    spec = common_pb2.DeploymentSpec(
        model=model,
        backend=backend,
        num_gpus=num_gpus,
        auto_scaling_config=common_pb2.AutoScalingConfig(
            metric="concurrency",
            target=target,
            min_instances=min_instances,
            max_instances=max_instances,
            keep_alive=keep_alive,
        ),
    )
    if backend_config:
        s = struct_pb2.Struct()
        s.update(backend_config)
        spec.backend_config.CopyFrom(s)
    return spec


def spec_from_config(config: Union[dict, str, Path], model: Optional[str] = None) -> common_pb2.DeploymentSpec:
    """A deployment spec from a ServerlessLLM deploy JSON file (a path or its parsed dict)."""
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    scaling = config.get("auto_scaling_config", {})
    return _spec(
        model=model or config.get("model", ""),
        backend=config.get("backend", "sim"),
        num_gpus=int(config.get("num_gpus", 1)),
        min_instances=int(scaling.get("min_instances", 0)),
        max_instances=int(scaling.get("max_instances", 1)),
        target=float(scaling.get("target", 1)),
        keep_alive=int(scaling.get("keep_alive", 0)),
        backend_config=config.get("backend_config"),
    )


# Sampling parameters beyond the common ones, passed as keyword arguments to generate():
# top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, logprobs,
# top_logprobs, json_schema (a dict or its JSON text) and regex.
_SAMPLING = {
    "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logprobs", "top_logprobs", "json_schema", "regex",
}


def _request(
    model: str,
    prompt: Optional[str],
    messages: Optional[Messages],
    max_tokens: int,
    temperature: Optional[float],
    top_p: Optional[float],
    stop: Optional[Sequence[str]],
    seed: Optional[int],
    progress: bool,
    sampling: dict,
) -> dispatch_pb2.GenerateRequest:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    params = dispatch_pb2.SamplingParams(max_tokens=max_tokens, stop=list(stop or []))
    for key, value in sampling.items():
        if key not in _SAMPLING:
            raise TypeError(f"unknown sampling parameter {key!r}; known: {', '.join(sorted(_SAMPLING))}")
        if value is None:
            continue
        if key == "json_schema" and not isinstance(value, str):
            value = json.dumps(value)
        setattr(params, key, value)
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    req = dispatch_pb2.GenerateRequest(model=model, params=params, progress=progress)
    if prompt is not None:
        req.prompt = prompt
    else:
        req.chat.messages.extend(
            dispatch_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or []
        )
    return req


_STAGES = {
    dispatch_pb2.Progress.STAGE_QUEUED: "queued",
    dispatch_pb2.Progress.STAGE_STARTING: "starting",
    dispatch_pb2.Progress.STAGE_LOADING: "loading",
    dispatch_pb2.Progress.STAGE_ROUTED: "routed",
}


def _event(e: dispatch_pb2.GenerateEvent) -> Optional[Event]:
    kind = e.WhichOneof("event")
    if kind == "chunk":
        lps = tuple(
            (t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in e.chunk.logprobs
        )
        return Chunk(text=e.chunk.text, tokens=e.chunk.tokens, logprobs=lps)
    if kind == "progress":
        p = e.progress
        return Progress(_STAGES.get(p.stage, "unknown"), p.message, p.worker_id, p.instance_id)
    if kind == "finished":
        u = e.finished.usage
        reason = dispatch_pb2.FinishReason.Name(e.finished.reason).removeprefix("FINISH_REASON_").lower()
        return Finished(
            finish_reason=reason,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            time_to_first_token_ms=u.time_to_first_token_us / 1000,
            queue_ms=u.queue_us / 1000,
            instance_id=u.instance_id,
        )
    return None


def _raise(err: grpc.RpcError) -> SllmError:
    return SllmError(err.code(), err.details() or "")


def to_dict(message: Any) -> dict:
    """A protobuf message as a plain dict (field names as in the proto)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class _ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, key: str):
        self._header = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        metadata = list(details.metadata or []) + [self._header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class Client:
    """A blocking client. Every service of an `sllm serve` or `sllm up` answers at one endpoint.
    Pass `api_key` when the cluster checks API keys; for an https:// endpoint, `tls_ca` (PEM
    CA bundle; default: the system roots) and, for mutual TLS, `tls_cert` and `tls_key`."""

    def __init__(
        self,
        endpoint: str = "127.0.0.1:50051",
        *,
        api_key: Optional[str] = None,
        timeout: Optional[float] = 30.0,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
    ):
        creds = _credentials(endpoint, tls_ca, tls_cert, tls_key)
        if creds is None:
            self._channel = grpc.insecure_channel(_target(endpoint))
        else:
            self._channel = grpc.secure_channel(_target(endpoint), creds)
        if api_key:
            self._channel = grpc.intercept_channel(self._channel, _ApiKey(api_key))
        self._timeout = timeout
        self._models = model_registry_pb2_grpc.ModelRegistryStub(self._channel)
        self._workers = worker_registry_pb2_grpc.WorkerRegistryStub(self._channel)
        self._scaler = scaler_pb2_grpc.ScalerStub(self._channel)
        self._dispatch = dispatch_pb2_grpc.DispatchStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def deploy(
        self,
        model: str,
        *,
        backend: str = "sim",
        num_gpus: int = 1,
        min_instances: int = 0,
        max_instances: int = 1,
        target: float = 1.0,
        keep_alive: int = 0,
        backend_config: Optional[dict] = None,
    ) -> common_pb2.Deployment:
        """Deploys a model (scaled to zero unless min_instances > 0)."""
        spec = _spec(model, backend, num_gpus, min_instances, max_instances, target, keep_alive, backend_config)
        return self.deploy_spec(spec)

    def deploy_config(self, config: Union[dict, str, Path], model: Optional[str] = None) -> common_pb2.Deployment:
        """Deploys from a ServerlessLLM deploy JSON file (a path) or its parsed dict."""
        return self.deploy_spec(spec_from_config(config, model))

    def deploy_spec(self, spec: common_pb2.DeploymentSpec) -> common_pb2.Deployment:
        try:
            resp = self._models.Deploy(model_registry_pb2.DeployRequest(spec=spec), timeout=self._timeout)
        except grpc.RpcError as e:
            raise _raise(e) from None
        return resp.deployment

    def update(
        self,
        model: str,
        *,
        min_instances: Optional[int] = None,
        max_instances: Optional[int] = None,
        target: Optional[float] = None,
        keep_alive: Optional[int] = None,
    ) -> common_pb2.Deployment:
        """Changes a model's scaling policy; fields left None keep their value."""
        current = self.get(model)
        c = current.spec.auto_scaling_config
        scaling = common_pb2.AutoScalingConfig(
            metric=c.metric or "concurrency",
            target=c.target if target is None else target,
            min_instances=c.min_instances if min_instances is None else min_instances,
            max_instances=c.max_instances if max_instances is None else max_instances,
            keep_alive=c.keep_alive if keep_alive is None else keep_alive,
        )
        req = model_registry_pb2.UpdateRequest(model=model, auto_scaling_config=scaling, expected_version=current.version)
        try:
            return self._models.Update(req, timeout=self._timeout).deployment
        except grpc.RpcError as e:
            raise _raise(e) from None

    def delete(self, model: str, lora_adapters: Optional[Sequence[str]] = None) -> common_pb2.Deployment:
        """Deletes a model: its instances drain, then it is removed. With lora_adapters, only
        those adapters are removed and the model stays."""
        req = model_registry_pb2.DeleteRequest(model=model, lora_adapters=list(lora_adapters or []))
        try:
            return self._models.Delete(req, timeout=self._timeout).deployment
        except grpc.RpcError as e:
            raise _raise(e) from None

    def embed(
        self,
        model: str,
        texts: Union[str, Sequence[str]],
        *,
        dimensions: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> List[List[float]]:
        """One vector per text, in order (a single string gives a list of one)."""
        inputs = [texts] if isinstance(texts, str) else list(texts)
        req = dispatch_pb2.EmbedRequest(model=model, input=inputs, dimensions=dimensions)
        try:
            resp = self._dispatch.Embed(req, timeout=timeout)
        except grpc.RpcError as e:
            raise _raise(e) from None
        return [list(e.values) for e in sorted(resp.embeddings, key=lambda e: e.index)]

    def rerank(
        self,
        model: str,
        query: str,
        documents: Sequence[str],
        *,
        top_n: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> List[Tuple[int, float]]:
        """The documents ranked against the query, the best first: (index in documents, score)."""
        req = dispatch_pb2.RerankRequest(model=model, query=query, documents=list(documents), top_n=top_n)
        try:
            resp = self._dispatch.Rerank(req, timeout=timeout)
        except grpc.RpcError as e:
            raise _raise(e) from None
        return [(r.index, r.relevance_score) for r in resp.results]

    def get(self, model: str) -> common_pb2.Deployment:
        try:
            return self._models.Get(model_registry_pb2.GetRequest(model=model), timeout=self._timeout)
        except grpc.RpcError as e:
            raise _raise(e) from None

    def models(self) -> list:
        try:
            return list(self._models.List(model_registry_pb2.ListRequest(), timeout=self._timeout).deployments)
        except grpc.RpcError as e:
            raise _raise(e) from None

    def workers(self) -> list:
        try:
            return list(self._workers.ListWorkers(worker_registry_pb2.ListWorkersRequest(), timeout=self._timeout).workers)
        except grpc.RpcError as e:
            raise _raise(e) from None

    def status(self, model: str) -> scaler_pb2.ScaleStatus:
        try:
            return self._scaler.GetScaleStatus(scaler_pb2.GetScaleStatusRequest(model=model), timeout=self._timeout)
        except grpc.RpcError as e:
            raise _raise(e) from None

    def generate(
        self,
        model: str,
        prompt: Optional[str] = None,
        *,
        messages: Optional[Messages] = None,
        max_tokens: int = 64,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        progress: bool = False,
        timeout: Optional[float] = None,
        **sampling,
    ) -> Iterator[Event]:
        """Streams a generation: Progress events (if asked for), Chunks, then one Finished.
        Leaving the loop early cancels the request on the worker. Further sampling parameters
        (top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, logprobs,
        top_logprobs, json_schema, regex) go as keyword arguments."""
        req = _request(model, prompt, messages, max_tokens, temperature, top_p, stop, seed, progress, sampling)
        call = self._dispatch.Generate(req, timeout=timeout)
        try:
            for e in call:
                ev = _event(e)
                if ev is not None:
                    yield ev
        except grpc.RpcError as e:
            raise _raise(e) from None
        finally:
            call.cancel()

    def complete(self, model: str, prompt: Optional[str] = None, **kwargs: Any) -> str:
        """The whole generated text."""
        return "".join(e.text for e in self.generate(model, prompt, **kwargs) if isinstance(e, Chunk))


class AsyncClient:
    """The asyncio client (grpc.aio); the same calls as Client, awaited."""

    def __init__(
        self,
        endpoint: str = "127.0.0.1:50051",
        *,
        timeout: Optional[float] = 30.0,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
    ):
        creds = _credentials(endpoint, tls_ca, tls_cert, tls_key)
        if creds is None:
            self._channel = grpc.aio.insecure_channel(_target(endpoint))
        else:
            self._channel = grpc.aio.secure_channel(_target(endpoint), creds)
        self._timeout = timeout
        self._models = model_registry_pb2_grpc.ModelRegistryStub(self._channel)
        self._dispatch = dispatch_pb2_grpc.DispatchStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def deploy(self, model: str, **kwargs: Any) -> common_pb2.Deployment:
        spec = _spec(
            model,
            kwargs.get("backend", "sim"),
            kwargs.get("num_gpus", 1),
            kwargs.get("min_instances", 0),
            kwargs.get("max_instances", 1),
            kwargs.get("target", 1.0),
            kwargs.get("keep_alive", 0),
            kwargs.get("backend_config"),
        )
        try:
            resp = await self._models.Deploy(model_registry_pb2.DeployRequest(spec=spec), timeout=self._timeout)
        except grpc.RpcError as e:
            raise _raise(e) from None
        return resp.deployment

    async def delete(self, model: str) -> common_pb2.Deployment:
        try:
            resp = await self._models.Delete(model_registry_pb2.DeleteRequest(model=model), timeout=self._timeout)
        except grpc.RpcError as e:
            raise _raise(e) from None
        return resp.deployment

    async def generate(
        self,
        model: str,
        prompt: Optional[str] = None,
        *,
        messages: Optional[Messages] = None,
        max_tokens: int = 64,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        progress: bool = False,
        timeout: Optional[float] = None,
        **sampling,
    ) -> AsyncIterator[Event]:
        req = _request(model, prompt, messages, max_tokens, temperature, top_p, stop, seed, progress, sampling)
        call = self._dispatch.Generate(req, timeout=timeout)
        try:
            async for e in call:
                ev = _event(e)
                if ev is not None:
                    yield ev
        except grpc.RpcError as e:
            raise _raise(e) from None
        finally:
            call.cancel()
