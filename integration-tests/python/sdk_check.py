"""Exercises the sllm Python SDK against a running cluster.

Usage: sdk_check.py HOST:PORT
"""
import asyncio
import sys

import grpc

import sllm

endpoint = sys.argv[1]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


with sllm.Client(endpoint) as client:
    d = client.deploy("sdk-model", backend="sim", max_instances=1, backend_config={"torch_dtype": "float16"})
    check(d.spec.model == "sdk-model" and d.version == 1, "deploy")
    check(any(m.spec.model == "sdk-model" for m in client.models()), "models lists it")
    check(len(client.workers()) == 1, "workers")

    events = list(client.generate("sdk-model", "hello", max_tokens=6, seed=1, progress=True))
    chunks = [e for e in events if isinstance(e, sllm.Chunk)]
    finished = [e for e in events if isinstance(e, sllm.Finished)]
    stages = [e.stage for e in events if isinstance(e, sllm.Progress)]
    check(sum(c.tokens for c in chunks) == 6, "six tokens streamed")
    check(len(finished) == 1 and finished[0].completion_tokens == 6, "finished with usage")
    check(stages[0] == "queued" and "routed" in stages, f"cold-start progress {stages}")
    again = client.complete("sdk-model", "hello", max_tokens=6, seed=1)
    check(again == "".join(c.text for c in chunks), "deterministic text")
    chat = client.complete("sdk-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    check(len(chat.split()) == 3, "chat input")

    try:
        list(client.generate("sdk-model", "hello", max_tokens=2, top_k=5))
        check(False, "the simulator refuses top_k")
    except sllm.SllmError as e:
        check(e.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in e.message, "sampling the backend cannot honour is refused, naming it")
    try:
        list(client.generate("sdk-model", "hello", colour=1))
        check(False, "an unknown sampling parameter is refused")
    except TypeError as e:
        check("colour" in str(e), "an unknown sampling parameter is refused")

    updated = client.update("sdk-model", max_instances=2)
    check(updated.spec.auto_scaling_config.max_instances == 2, "update")
    check(client.status("sdk-model").desired >= 1, "status")

    try:
        client.deploy("sdk-model")
        check(False, "duplicate refused")
    except sllm.SllmError as e:
        check(e.code == grpc.StatusCode.ALREADY_EXISTS, "duplicate gives ALREADY_EXISTS")
    try:
        list(client.generate("nope", "x"))
        check(False, "unknown model refused")
    except sllm.SllmError as e:
        check(e.code == grpc.StatusCode.NOT_FOUND and "nope" in e.message, "unknown model gives NOT_FOUND")

    vectors = client.embed("sdk-model", ["a b", "c"], dimensions=8)
    check(len(vectors) == 2 and len(vectors[0]) == 8 and vectors[0] != vectors[1], "embed")
    check(client.embed("sdk-model", "a b", dimensions=8) == vectors[:1], "embed one text")
    ranked = client.rerank("sdk-model", "where do foxes live", ["paris is a city", "foxes live in dens", "hi"])
    check([i for i, _ in ranked] == [1, 0, 2] and ranked[0][1] > ranked[1][1], f"rerank, the best first ({ranked})")
    check(len(client.rerank("sdk-model", "foxes", ["a", "foxes"], top_n=1)) == 1, "rerank top_n")
    try:
        client.rerank("sdk-model", "q", ["a", ""])
        check(False, "an empty document is refused")
    except sllm.SllmError as e:
        check(e.code == grpc.StatusCode.INVALID_ARGUMENT and "documents[1]" in str(e), f"an empty document is named ({e})")

    gone = client.delete("sdk-model")
    check(gone.state == sllm.v1.common_pb2.DEPLOYMENT_STATE_DELETING, "delete")


async def run_async():
    c = sllm.AsyncClient(endpoint)
    await c.deploy("sdk-async", max_instances=1)
    text = ""
    async for e in c.generate("sdk-async", "hi", max_tokens=4):
        if isinstance(e, sllm.Chunk):
            text += e.text
    check(len(text.split()) == 4, "async generate")
    await c.delete("sdk-async")
    await c.close()


asyncio.run(run_async())
print("all sdk checks passed")
