"""LoRA adapters through sllm with the official `openai` client, each way a client names one:
`base:adapter`, the adapter's name alone, and ServerlessLLM's `lora_adapter_name`. The backend
(the simulator behind a vLLM-shaped engine) writes different text for each adapter.

Usage: lora_check.py BASE_URL STEP   (STEP: started | added | removed)
Exits non-zero (with the failed check) on the first mismatch.
"""
import sys

import openai

base_url, step = sys.argv[1].rstrip("/"), sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def say(model, **extra):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6,
        temperature=0, extra_body=extra or None)
    return r.choices[0].message.content, r.model


def refused(model, words, **extra):
    try:
        say(model, **extra)
        check(False, f"{model} {extra} is refused")
    except openai.NotFoundError as e:
        check(words in str(e), f"{model} {extra} is not found: {e}")


base, _ = say("base/m")
if step in ("started", "added"):
    a1, answered_as = say("base/m:a1")
    check(a1 != base, "an adapter writes its own text")
    check(answered_as == "base/m:a1", "the answer names what was asked for")
    check(say("a1")[0] == a1, "the adapter by its name alone")
    check(say("base/m", lora_adapter_name="a1")[0] == a1, "ServerlessLLM's lora_adapter_name")
    check(say("base/m:a1")[0] == a1, "the same adapter, the same text")
    ids = {m.id: m.model_extra.get("parent") for m in client.models.list()}
    check(ids.get("base/m:a1") == "base/m", f"listed with its parent ({ids})")
    refused("base/m:nope", 'no LoRA adapter "nope"')
if step == "added":
    a2 = say("base/m:a2")[0]
    check(a2 not in (base, say("base/m:a1")[0]), "the added adapter writes its own text")
    check(client.models.retrieve("a2").model_extra["parent"] == "base/m", "retrieve an adapter")
if step == "removed":
    refused("base/m:a1", 'no LoRA adapter "a1" (it has: a2)')
    refused("base/m", 'no LoRA adapter "a1"', lora_adapter_name="a1")
    check(say("a2")[0] != base, "the other adapter still answers")
print(f"{step} checks passed")
