"""The official `openai` client against sllm with a real llama.cpp server behind it, compared
with the same llama-server called directly.

Usage: llamacpp_check.py SLLM_BASE_URL DIRECT_BASE_URL MODEL
Exits non-zero (with the failed check) on the first mismatch.
"""
import json
import sys
import time
import urllib.request

import openai

sllm_base, direct_base, model = sys.argv[1], sys.argv[2], sys.argv[3]
sllm = openai.OpenAI(base_url=sllm_base, api_key="unused", max_retries=0, timeout=60)
direct = openai.OpenAI(base_url=direct_base, api_key="unused", max_retries=0, timeout=60)
GREEDY = {"temperature": 0, "seed": 7}


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def chat(client, content, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kw
    )


# A cold start from zero: the first request waits for an instance, then is answered.
t0 = time.monotonic()
first = chat(sllm, "Hello there", max_tokens=8, **GREEDY)
check(first.choices[0].message.content is not None, f"cold start answered in {time.monotonic() - t0:.2f} s")

# Chat goes to the engine's chat endpoint: its template applies, so the prompt token count is
# the engine's own count for the templated conversation, and the text is the engine's.
a = chat(sllm, "Tell me a story", max_tokens=24, **GREEDY)
b = chat(direct, "Tell me a story", max_tokens=24, **GREEDY)
check(a.choices[0].message.content == b.choices[0].message.content, "greedy chat text is the engine's own")
check(a.usage.prompt_tokens == b.usage.prompt_tokens, f"chat prompt tokens are the templated count ({a.usage.prompt_tokens})")
plain = direct.completions.create(model=model, prompt="Tell me a story", max_tokens=1, **GREEDY)
check(a.usage.prompt_tokens > plain.usage.prompt_tokens, "the chat template added its role markers")
check(a.choices[0].finish_reason == b.choices[0].finish_reason, "chat finish_reason is the engine's")
check(a.model == model and a.id.startswith("chatcmpl-"), "id and model are sllm's")
again = chat(sllm, "Tell me a story", max_tokens=24, **GREEDY)
check(again.choices[0].message.content == a.choices[0].message.content, "temperature 0 with a seed gives the same text twice")

# Streamed chat: the same text, the engine's events.
text, finish, usage, ids = "", None, None, set()
for chunk in chat(sllm, "Tell me a story", max_tokens=24, stream=True, stream_options={"include_usage": True}, **GREEDY):
    ids.add(chunk.id)
    if chunk.usage:
        usage = chunk.usage
    for ch in chunk.choices:
        text += ch.delta.content or ""
        finish = ch.finish_reason or finish
check(text == b.choices[0].message.content, "streamed chat text is the engine's")
check(finish == b.choices[0].finish_reason, "streamed chat finish_reason")
check(usage is not None and usage.prompt_tokens == b.usage.prompt_tokens, "streamed chat usage, when asked for")
check(len(ids) == 1, "one id across the stream")
no_usage = list(chat(sllm, "Tell me a story", max_tokens=4, stream=True, **GREEDY))
check(all(c.usage is None for c in no_usage), "no usage event unasked")

# Completions: non-streamed and streamed, the engine's text.
ca = sllm.completions.create(model=model, prompt="Once upon a time", max_tokens=16, **GREEDY)
cb = direct.completions.create(model=model, prompt="Once upon a time", max_tokens=16, **GREEDY)
check(ca.choices[0].text == cb.choices[0].text, "completion text is the engine's")
check(ca.usage.prompt_tokens == cb.usage.prompt_tokens and ca.usage.completion_tokens == cb.usage.completion_tokens, "completion usage is the engine's")
streamed = "".join(
    c.choices[0].text for c in sllm.completions.create(model=model, prompt="Once upon a time", max_tokens=16, stream=True, **GREEDY) if c.choices
)
check(streamed == cb.choices[0].text, "streamed completion text is the engine's")

# A batch of prompts: one choice each, numbered and written as the engine answers them.
batch = ["Once upon a time", "The sea"]
ba = sllm.completions.create(model=model, prompt=batch, max_tokens=8, **GREEDY)
bb = direct.completions.create(model=model, prompt=batch, max_tokens=8, **GREEDY)
check(len(ba.choices) == 2 and [(c.index, c.text) for c in ba.choices] == [(c.index, c.text) for c in bb.choices], "a batch of prompts is answered as the engine answers it")
check(ba.choices[0].text == cb.choices[0].text[: len(ba.choices[0].text)], "a batch's first answer is that prompt's own")


def streamed_batch(client):
    texts, usage = {}, []
    for c in client.completions.create(model=model, prompt=batch, max_tokens=8, stream=True, stream_options={"include_usage": True}, **GREEDY):
        if c is None:
            continue
        for ch in c.choices or []:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
        if c.usage:
            usage.append((c.usage.prompt_tokens, c.usage.completion_tokens))
    return texts, usage


sa_, sb_ = streamed_batch(sllm), streamed_batch(direct)
check(sa_[0] == sb_[0] and len(sa_[0]) == 2, f"a streamed batch's texts are the engine's ({len(sa_[0])} prompts)")
check(sa_[1] == sb_[1] and len(sa_[1]) == 2, f"a streamed batch's usage is the engine's, each prompt's ({sa_[1]})")

# Several choices: llama.cpp's server takes n = 1 only, and says so; its 400 comes back.
for client in (sllm, direct):
    try:
        client.completions.create(model=model, prompt="Hi", max_tokens=4, n=2)
        check(False, "n = 2 is refused by llama.cpp")
    except openai.BadRequestError as e:
        check("'n'" in str(e), f"llama.cpp's own refusal of n = 2: {str(e)[:120]}")

# The Responses API: the engine's answer and its typed events, with the client's model.
def respond(client, **kw):
    return client.responses.create(model=model, input="Tell me a story", max_output_tokens=12, temperature=0, **kw)


ra_, rb_ = respond(sllm), respond(direct)
check(ra_.output_text and ra_.output_text == rb_.output_text, "a response's text is the engine's")
check((ra_.usage.input_tokens, ra_.usage.output_tokens) == (rb_.usage.input_tokens, rb_.usage.output_tokens), "a response's usage is the engine's")
check(ra_.model == model and ra_.status == rb_.status, "a response's model and status")


def events(client):
    seen, text = [], ""
    for ev in respond(client, stream=True):
        seen.append(ev.type)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type == "response.completed":
            usage = ev.response.usage
    return seen, text, (usage.input_tokens, usage.output_tokens)


sa, sb = events(sllm), events(direct)
check(sa[0] == sb[0] and sa[0][-1] == "response.completed", f"a streamed response's events are the engine's ({len(sa[0])} of them)")
check(sa[1] == ra_.output_text, "a streamed response's text is the engine's")
check(sa[2] == sb[2], "a streamed response's usage is the engine's")


def named(base):
    body = {"model": model, "input": "Tell me a story", "max_output_tokens": 12, "temperature": 0, "stream": True}
    req = urllib.request.Request(base + "/responses", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [line.decode().rstrip("\r\n") for line in r]
    return [line for line in lines if line.startswith("event:") or line == "data: [DONE]"]


na, nb = named(sllm_base), named(direct_base)
check(na == nb and "data: [DONE]" not in na, f"each event named as the engine names it, and no [DONE] ({na[-1]})")
try:
    sllm.responses.create(model=model, input="hello " * 3000, max_output_tokens=4)
    check(False, "an over-long input is refused")
except openai.BadRequestError as e:
    check("context" in str(e).lower(), f"an over-long input gets the engine's 400: {str(e)[:120]}")

# The model card says the context the deployment starts the engine with (its ctx_size), which is
# the one the engine itself reports.
root_of = lambda base: base[: -len("/v1")] if base.endswith("/v1") else base
with urllib.request.urlopen(root_of(direct_base) + "/props", timeout=60) as r:
    n_ctx = json.loads(r.read())["default_generation_settings"]["n_ctx"]
card = sllm.models.retrieve(model).model_extra
check(card.get("max_model_len") == n_ctx, f"the card's max_model_len is the engine's context ({card.get('max_model_len')} and {n_ctx})")

# The engine's own /tokenize and /detokenize (llama.cpp names the text `content`), at the
# server's root rather than under /v1.
def post(base, path, body):
    root = base[: -len("/v1")] if base.endswith("/v1") else base
    req = urllib.request.Request(root + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.headers.get("x-request-id"), json.loads(r.read())


text = "Hello world, tell me a story"
tok = {"model": model, "content": text, "add_special": True, "with_pieces": True}
(rid, ta), (_, tb) = post(sllm_base, "/tokenize", tok), post(direct_base, "/tokenize", tok)
check(ta == tb and len(ta["tokens"]) > 1, f"/tokenize answers as the engine does ({len(ta['tokens'])} tokens)")
check(rid is not None and rid.startswith("tokn-"), f"/tokenize says its request id ({rid})")
counted = sllm.completions.create(model=model, prompt=text, max_tokens=1, **GREEDY).usage.prompt_tokens
check(counted == len(ta["tokens"]), f"the count is the prompt's usage ({counted})")
ids = [t["id"] for t in ta["tokens"]]
(_, da), (_, db) = post(sllm_base, "/detokenize", {"model": model, "tokens": ids}), post(direct_base, "/detokenize", {"model": model, "tokens": ids})
check(da == db and text in da["content"], f"/detokenize answers as the engine does: {json.dumps(da)[:80]}")

# Log-probabilities come back, as the engine computed them.
la = chat(sllm, "Hi", max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
lb = chat(direct, "Hi", max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
check(la.choices[0].logprobs is not None and len(la.choices[0].logprobs.content) > 0, "chat logprobs come back")
check([t.token for t in la.choices[0].logprobs.content] == [t.token for t in lb.choices[0].logprobs.content], "chat logprob tokens are the engine's")
check(all(len(t.top_logprobs) == 2 for t in la.choices[0].logprobs.content), "top_logprobs as asked")
cl = sllm.completions.create(model=model, prompt="Hi", max_tokens=4, logprobs=2, **GREEDY)
check(cl.choices[0].logprobs is not None, "completion logprobs come back")

# response_format reaches the engine (its grammar constrains the output the same way).
ra = chat(sllm, "Give me JSON", max_tokens=16, response_format={"type": "json_object"}, **GREEDY)
rb = chat(direct, "Give me JSON", max_tokens=16, response_format={"type": "json_object"}, **GREEDY)
check(ra.choices[0].message.content == rb.choices[0].message.content, "response_format output is the engine's")
check(ra.choices[0].message.content.lstrip().startswith("{"), "the JSON grammar applied")

# A prompt over the context length: the engine's 400 and message, streamed or not.
long_prompt = "hello " * 3000
for stream in (False, True):
    try:
        r = sllm.completions.create(model=model, prompt=long_prompt, max_tokens=4, stream=stream)
        if stream:
            list(r)
        check(False, f"an over-long prompt is refused (stream={stream})")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"an over-long prompt is a 400 (stream={stream})")
        check("context" in str(e).lower(), f"with the engine's message (stream={stream}): {str(e)[:160]}")

# Non-ASCII text arrives byte-exact: find a greedy answer with non-ASCII characters, then stream it.
found = None
for i in range(40):
    prompt = f"Write in another language, attempt {i}"
    want = direct.completions.create(model=model, prompt=prompt, max_tokens=48, **GREEDY).choices[0].text
    if any(ord(ch) > 127 for ch in want):
        found = (prompt, want)
        break
check(found is not None, "a greedy answer with non-ASCII characters exists")
prompt, want = found
got = "".join(
    c.choices[0].text for c in sllm.completions.create(model=model, prompt=prompt, max_tokens=48, stream=True, **GREEDY) if c.choices
)
check(got == want, f"non-ASCII text arrives byte-exact ({json.dumps(want)[:80]})")

print("all llama.cpp checks passed")
