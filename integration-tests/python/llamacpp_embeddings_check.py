"""The official `openai` client's embeddings.create through sllm with a real llama-server
(`--embeddings --pooling mean`) behind it, compared with the same server called directly.

Usage: llamacpp_embeddings_check.py SLLM_BASE_URL DIRECT_BASE_URL MODEL GRPC_VECTOR_JSON
Exits non-zero (with the failed check) on the first mismatch.
"""
import base64
import json
import struct
import sys

import openai

sllm_base, direct_base, model, grpc_vector = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sllm = openai.OpenAI(base_url=sllm_base, api_key="unused", max_retries=0, timeout=60)
direct = openai.OpenAI(base_url=direct_base, api_key="unused", max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def floats(v):
    """A vector as floats (the client hands an explicit base64 answer back undecoded)."""
    if isinstance(v, str):
        raw = base64.b64decode(v)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return v


def close(a, b):
    a, b = floats(a), floats(b)
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4


for fmt in ["float", "base64"]:
    a = sllm.embeddings.create(model=model, input=["Hello there", "Something else"],
                               encoding_format=fmt)
    b = direct.embeddings.create(model=model, input=["Hello there", "Something else"],
                                 encoding_format=fmt)
    check(a.model == model, f"{fmt}: sllm's answer names the model")
    check(len(a.data) == 2 and all(close(x.embedding, y.embedding) for x, y in zip(a.data, b.data)),
          f"{fmt}: the same vectors as the server alone")
    check(a.usage.prompt_tokens == b.usage.prompt_tokens, f"{fmt}: the same usage")
check(close(json.loads(grpc_vector), a.data[0].embedding), "gRPC Embed gave the same vector")

a = sllm.embeddings.create(model=model, input="Hello there")
check(len(a.data) == 1, "a single string")
print("all llama.cpp embeddings checks passed")
