"""An OpenAI completions engine served the way vLLM and SGLang serve theirs: a Starlette app on
uvicorn, streams as a StreamingResponse. What matters to the tests is uvicorn's HTTP/1.1 (its
keep-alive, and the chunked body's last chunk written on its own after `[DONE]`), not the text.

    python uvicorn_engine.py --port PORT --model NAME [--ports-file PATH]

GET /health answers 200; POST /v1/completions streams `max_tokens` tokens (or answers whole).
The client port of each completion (one port per TCP connection) is appended to PATH, a line
each.
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


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/v1/completions", completions, methods=["POST"]),
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
