"""The official `openai` client's embeddings.create against sllm (a simulated embedding model,
deployed scaled to zero, so the first call also starts it).

Usage: embeddings_check.py BASE_URL MODEL
Exits non-zero (with the failed check) on the first mismatch.
"""
import math
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def norm(v):
    return math.sqrt(sum(x * x for x in v))


# The client's default asks for base64 and decodes it.
r = client.embeddings.create(model=model, input="hello world")
v = r.data[0].embedding
check(len(r.data) == 1 and len(v) == 384, f"one vector of 384 ({len(v)})")
check(abs(norm(v) - 1.0) < 1e-4, "normalised")
check(r.model == model and r.usage.prompt_tokens == 2, f"model and usage ({r.model}, {r.usage})")

f = client.embeddings.create(model=model, input="hello world", encoding_format="float")
check(max(abs(a - b) for a, b in zip(f.data[0].embedding, v)) < 1e-6,
      "float and base64 give the same vector, and the same text the same vector")

r = client.embeddings.create(model=model, input=["a", "b", "a"], encoding_format="float")
e = [d.embedding for d in r.data]
check([d.index for d in r.data] == [0, 1, 2], "one vector per input, in order")
check(e[0] == e[2] and e[0] != e[1], "equal texts, equal vectors; different texts, different")

r = client.embeddings.create(model=model, input="short", dimensions=16)
check(len(r.data[0].embedding) == 16 and abs(norm(r.data[0].embedding) - 1.0) < 1e-4,
      "dimensions shortens the vector, still normalised")

r = client.embeddings.create(model=model, input=[[1, 2, 3], [4, 5]], encoding_format="float")
check(len(r.data) == 2, "token-id inputs")

for kwargs, field in [
    ({"input": "x", "dimensions": 9999}, "dimensions"),
    ({"input": []}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
]:
    try:
        client.embeddings.create(model=model, **kwargs)
        check(False, f"{kwargs} is refused")
    except openai.BadRequestError as err:
        check(field in str(err), f"{kwargs} refused naming {field}: {err}")
try:
    client.embeddings.create(model="no/such-model", input="x")
    check(False, "an unknown model is refused")
except openai.NotFoundError:
    check(True, "an unknown model is a NotFoundError")

print("all embeddings checks passed")
