"""An OpenAI completions engine served the way vLLM and SGLang serve theirs: a Starlette app on
uvicorn, streams as a StreamingResponse. What matters to the tests is uvicorn's HTTP/1.1 (its
keep-alive, and the chunked body's last chunk written on its own after `[DONE]`), not the text.

    python uvicorn_engine.py --port PORT --model NAME [--ports-file PATH]

GET /health answers 200; POST /v1/completions streams `max_tokens` tokens (or answers whole).
The client port of each completion (one port per TCP connection) is appended to PATH, a line
each. POST /v1/responses answers OpenAI's Responses API as vLLM frames it (`event: <type>` and
`data: <json>`, each event numbered, no `[DONE]`), `max_output_tokens` words; an input of
"break" ends the stream after two words without its last event, as an engine that died would.
"""

import argparse
import asyncio
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ports_file: str | None = None


async def health(_: Request) -> Response:
    return Response(status_code=200)


def chunk(model: str, text: str, finish: str | None) -> dict:
    return {
        "id": "cmpl-uvicorn",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


async def completions(request: Request) -> Response:
    if ports_file and request.client is not None:
        with open(ports_file, "a") as f:
            f.write(f"{request.client.port}\n")
    body = await request.json()
    model, n = body.get("model", ""), int(body.get("max_tokens") or 16)
    words = [f" w{i}" for i in range(n)]
    usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
    if not body.get("stream"):
        whole = chunk(model, "".join(words), "length")
        whole["usage"] = usage
        return JSONResponse(whole)

    async def events():
        for i, w in enumerate(words):
            yield "data: " + json.dumps(chunk(model, w, "length" if i == n - 1 else None)) + "\n\n"
        yield "data: [DONE]\n\n"
        # Under load, other requests' work runs between the last event's write and the body's
        # end (each `send` gives the event loop a turn): here, for certain, a short pause.
        await asyncio.sleep(0.002)

    return StreamingResponse(events(), media_type="text/event-stream")


async def responses(request: Request) -> Response:
    body = await request.json()
    model, n = body.get("model", ""), int(body.get("max_output_tokens") or 16)
    words = [f" w{i}" for i in range(n)]
    item = {"type": "message", "id": "msg_uvicorn", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "".join(words), "annotations": []}]}
    response = {"id": "resp_uvicorn", "object": "response", "created_at": int(time.time()),
                "model": model, "status": "completed", "output": [item],
                "usage": {"input_tokens": 1, "output_tokens": n, "total_tokens": n + 1}}
    if not body.get("stream"):
        return JSONResponse(response)
    cut = body.get("input") == "break"

    async def events():
        seq = 0

        def event(kind: str, **fields) -> str:
            nonlocal seq
            seq += 1
            data = {"type": kind, "sequence_number": seq - 1, **fields}
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

        yield event("response.created", response={**response, "status": "in_progress", "output": [], "usage": None})
        for i, w in enumerate(words):
            if cut and i == 2:
                return
            yield event("response.output_text.delta", item_id="msg_uvicorn", output_index=0, content_index=0, delta=w)
        yield event("response.completed", response=response)

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
    ]
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="m")
    parser.add_argument("--ports-file")
    args = parser.parse_args()
    ports_file = args.ports_file
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
