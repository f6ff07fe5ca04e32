"""The official `openai` client reading a stream whose engine crashes mid-way, so that sllm
moves it to another instance: prints one JSON object with what the client saw — the text, the
finish, the `migrations` field sllm adds to the stream's last chunks (the client keeps fields
it does not know in `model_extra`), the usage, how many ids the chunks had, and whether any
token ids the client did not ask for reached it.

Usage: migration_check.py SLLM_BASE_URL MODEL completion|chat
"""
import json
import sys

import openai

base, model, kind = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
ARGS = {"max_tokens": 80, "seed": 7, "stream": True, "stream_options": {"include_usage": True}}


def extra(obj, key):
    return (obj.model_extra or {}).get(key)


if kind == "completion":
    stream = client.completions.create(model=model, prompt="hello engine", **ARGS)
else:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a story"}]
    stream = client.chat.completions.create(model=model, messages=messages, **ARGS)

seen = {"text": "", "finish": None, "finish_migrations": None, "usage": None,
        "usage_migrations": None, "unasked_ids": False, "roles": 0}
ids = set()
for chunk in stream:
    ids.add(chunk.id)
    if extra(chunk, "prompt_token_ids") is not None:
        seen["unasked_ids"] = True
    for ch in chunk.choices:
        if kind == "completion":
            seen["text"] += ch.text or ""
        else:
            seen["text"] += ch.delta.content or ""
            seen["roles"] += int(ch.delta.role is not None)
        if extra(ch, "token_ids") is not None or extra(ch, "prompt_token_ids") is not None:
            seen["unasked_ids"] = True
        if ch.finish_reason:
            seen["finish"] = ch.finish_reason
            seen["finish_migrations"] = extra(chunk, "migrations")
    if chunk.usage:
        seen["usage"] = chunk.usage.model_dump(exclude_none=True)
        seen["usage_migrations"] = extra(chunk, "migrations")
seen["ids"] = len(ids)
print(json.dumps(seen))
