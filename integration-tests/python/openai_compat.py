"""Drives sllm's OpenAI-compatible API with the official `openai` package.

Usage: openai_compat.py BASE_URL EXPECTED_TEXT
Exits non-zero (with the failed check) on the first mismatch.
"""
import sys
import threading

import openai

base, expected = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=20)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


ids = [m.id for m in client.models.list().data]
check("m" in ids and "cold" in ids, f"models.list shows the deployments ({ids})")
short = client.models.retrieve("short")
check(short.model_extra.get("max_model_len") == 16, f"a card says the context length its deployment sets ({short})")
check("max_model_len" not in client.models.retrieve("m").model_extra, "and no context length where none is set")
try:
    client.completions.create(model="short", prompt="Say hi", max_tokens=20)
    check(False, "a prompt and max_tokens beyond the context length are refused")
except openai.BadRequestError as e:
    check("maximum context length is 16 tokens" in str(e), f"beyond the context length: a 400 as vLLM words it ({str(e)[:100]})")
r = client.completions.create(model="short", prompt="Say hi", max_tokens=14)
check(r.usage.completion_tokens == 14, "within the context length, served")

r = client.completions.create(model="m", prompt="Say hi", max_tokens=8, seed=7)
check(r.choices[0].text == expected, "completion text")
check(r.choices[0].finish_reason == "length", "completion finish_reason")
check(r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 2, "completion usage")
check(r._request_id == r.id, "the x-request-id header is the answer's id")

parts = list(client.completions.create(model="m", prompt="Say hi", max_tokens=8, seed=7, stream=True))
check("".join(p.choices[0].text for p in parts if p.choices) == expected, "streamed completion text")
check(parts[-1].choices[0].finish_reason == "length", "streamed completion ends with finish_reason")

chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=3)
check(chat.choices[0].message.role == "assistant", "chat role")
check(len(chat.choices[0].message.content.split()) == 5, "chat content has 5 tokens")
check(chat.usage.completion_tokens == 5, "chat usage")

stream = client.chat.completions.create(
    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=3, stream=True,
    stream_options={"include_usage": True},
)
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for ch in chunk.choices:
        text += ch.delta.content or ""
        finish = ch.finish_reason or finish
check(text == chat.choices[0].message.content, "streamed chat matches the non-streamed one")
check(finish == "length", "streamed chat finish_reason")
check(usage is not None and usage.completion_tokens == 5, "streamed chat usage chunk")

# ServerlessLLM's name:backend form names the same deployment.
r = client.completions.create(model="m:sim", prompt="Say hi", max_tokens=8, seed=7)
check(r.choices[0].text == expected, "name:backend model id")

try:
    client.completions.create(model="nope", prompt="x", max_tokens=1)
    check(False, "unknown model refused")
except openai.NotFoundError as e:
    check(e.status_code == 404 and "nope" in str(e), "unknown model gives 404 NotFoundError")
    check((e.request_id or "").startswith("cmpl-"), f"an error carries its request id too ({e.request_id})")

try:
    client.completions.create(model="m", prompt="x", max_tokens=-5)
    check(False, "bad max_tokens refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and "max_tokens" in str(e), "bad max_tokens gives 400 naming the field")

# The Responses API over a backend that answers with text: Dispatch writes the response.
greedy = {"model": "m", "instructions": "be brief", "max_output_tokens": 8, "temperature": 0}
r = client.responses.create(input="Say hi", **greedy)
check(r.object == "response" and r.id.startswith("resp_") and r.model == "m", "a response, with its id and model")
check(r._request_id == r.id, "a written response's id is its request id")
check(r.output_text and r.usage.output_tokens == 8 and r.usage.total_tokens == r.usage.input_tokens + 8, "its text and usage")
check(r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", "stopped by max_output_tokens: incomplete, saying why")
items = client.responses.create(input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}], **greedy)
check(items.output_text == r.output_text, "input as messages: the same conversation, the same text")
kinds, numbers, text = [], [], ""
for ev in client.responses.create(input="Say hi", stream=True, **greedy):
    kinds.append(ev.type)
    numbers.append(ev.sequence_number)
    if ev.type == "response.output_text.delta":
        text += ev.delta
    last = ev
check(kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"], "a stream opens as OpenAI's does")
check(kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"], "and ends as OpenAI's does")
check(numbers == list(range(len(numbers))), "every event numbered in order")
check(text == r.output_text and last.response.output[0].content[0].text == text, "the streamed text is the answer's")
check(last.response.usage.output_tokens == 8, "the last event carries the usage")
try:
    client.responses.create(input="x", tools=[{"type": "web_search"}], model="m")
    check(False, "a tool the simulator cannot run is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and "tools" in str(e), "a field the simulator cannot honour is refused, naming it")

# "never" needs more GPUs than any worker has: refused at once, saying why.
try:
    client.completions.create(model="never", prompt="x", max_tokens=1)
    check(False, "unplaceable model refused")
except openai.InternalServerError as e:
    body = e.body if isinstance(e.body, dict) else {}
    check(
        e.status_code == 503 and "64 GPUs" in str(e) and body.get("code") == "model_unplaceable",
        "a model no worker can hold gives 503 saying why",
    )

# One request waits for "stuck" (its load never ends); the next finds the queue full.
held = threading.Thread(
    target=lambda: client.with_options(timeout=3).completions.create(model="stuck", prompt="x", max_tokens=1),
    daemon=True,
)
held.start()
import time

time.sleep(0.5)
try:
    client.completions.create(model="stuck", prompt="x", max_tokens=1)
    check(False, "full queue refused")
except openai.RateLimitError as e:
    check(e.status_code == 429 and e.response.headers.get("retry-after"), "full queue gives 429 with Retry-After")

print("all openai checks passed")
