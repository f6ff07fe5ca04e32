"""The HTTP requests ServerlessLLM's own CLI sends (sllm/cli/_cli_utils.py: deploy_model,
delete_model, show_status), built the way it builds them and sent to sllm's OpenAI port as
LLM_SERVER_URL, then the official `openai` client's model lookups.

Usage: serverlessllm_cli_replay.py LLM_SERVER_URL
Exits non-zero (with the failed check) on the first mismatch.
"""
import copy
import json
import sys
import urllib.error
import urllib.request

import openai

base_url = sys.argv[1].rstrip("/")

# ServerlessLLM's sllm/cli/default_config.json.
DEFAULT_CONFIG = {
    "model": "",
    "backend": "vllm",
    "num_gpus": 1,
    "auto_scaling_config": {
        "metric": "concurrency",
        "target": 1,
        "min_instances": 0,
        "max_instances": 10,
        "keep_alive": 0,
    },
    "backend_config": {
        "pretrained_model_name_or_path": "",
        "device_map": "auto",
        "torch_dtype": "float16",
        "hf_model_class": "AutoModelForCausalLM",
    },
}


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def send(method, path, body=None):
    """One request as `requests` sends it with json=: a JSON body, Content-Type set."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base_url + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def split_items(value):
    return value.replace(",", " ").split()


def deploy_model(model, backend=None, num_gpus=None, target=None, min_instances=None,
                 max_instances=None, lora_adapters=None, enable_lora=False, precision=None):
    """`sllm deploy --model …`: the body its deploy_model builds (click passes
    enable_lora=False when the flag is absent, and the body then carries it)."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["model"] = model
    config.setdefault("backend_config", {})["pretrained_model_name_or_path"] = model
    if backend:
        config["backend"] = backend
    if num_gpus is not None:
        config["num_gpus"] = num_gpus
    if target is not None:
        config.setdefault("auto_scaling_config", {})["target"] = target
    if min_instances is not None:
        config["auto_scaling_config"]["min_instances"] = min_instances
    if max_instances is not None:
        config["auto_scaling_config"]["max_instances"] = max_instances
    if lora_adapters:
        adapters = {}
        for item in split_items(lora_adapters):
            name, path = item.split("=", 1)
            adapters[name] = path
        config.setdefault("backend_config", {})["lora_adapters"] = adapters
    if enable_lora is not None:
        config.setdefault("backend_config", {})["enable_lora"] = enable_lora
    if precision:
        config.setdefault("backend_config", {})["precision"] = precision
    return send("POST", "/register", config)


def delete_model(model, lora_adapters=None):
    """`sllm delete MODEL [--lora-adapters …]`: one POST /delete per model."""
    data = {"model": model}
    if lora_adapters is not None:
        items = split_items(lora_adapters)
        if all("=" in i for i in items):
            data["lora_adapters"] = dict(i.split("=", 1) for i in items)
        else:
            data["lora_adapters"] = items
    return send("POST", "/delete", data)


def show_status():
    """`sllm status`: the ids it prints from GET /v1/models's `models`."""
    status, text = send("GET", "/v1/models")
    check(status == 200, f"GET /v1/models answers 200 ({status} {text})")
    return [m["id"] for m in json.loads(text).get("models", [])]


# sllm deploy --model facebook/opt-125m
status, text = deploy_model("facebook/opt-125m")
check(status == 200 and json.loads(text)["status"] == "ok", f"register ({status} {text})")
check(show_status() == ["facebook/opt-125m"], "status lists it")

# A chat completion, as its users send one (it starts the model).
status, text = send("POST", "/v1/chat/completions", {
    "model": "facebook/opt-125m",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 4,
})
check(status == 200 and json.loads(text)["choices"][0]["message"]["content"], f"chat ({status})")

# sllm deploy --model facebook/opt-125m --enable-lora --lora-adapters "demo-lora1=… demo-lora2=…"
status, text = deploy_model(
    "facebook/opt-125m",
    enable_lora=True,
    lora_adapters="demo-lora1=crumb/FLAN-OPT-125M-LoRA demo-lora2=GrantC/alpaca-opt-125m-lora",
)
body = json.loads(text)
check(status == 200 and "only its LoRA adapters" in " ".join(body["warnings"]),
      f"register again adds the adapters and says so ({status} {text})")
check(show_status() == ["facebook/opt-125m", "facebook/opt-125m:demo-lora1",
                        "facebook/opt-125m:demo-lora2"], f"status lists the adapters ({show_status()})")

# The same model again, with no adapters: nothing to do, and said so.
status, text = deploy_model("facebook/opt-125m")
check(status == 409 and "already deployed" in json.loads(text)["detail"], f"409 ({status} {text})")

# A bad field is named.
status, text = send("POST", "/register", {"model": "x/y", "backend": "vllm", "num_gpus": "two"})
check(status == 400 and "num_gpus" in json.loads(text)["detail"], f"400 num_gpus ({text})")
status, text = send("POST", "/register", {"model": "x/y", "backend": "vllm",
                                          "backend_config": {"max_model_lenght": 1}})
check(status == 400 and "backend_config.max_model_lenght" in text, f"400 key ({text})")

# POST /update with a new auto_scaling_config (the keys given, over the stored ones).
status, text = send("POST", "/update", {"model": "facebook/opt-125m",
                                        "auto_scaling_config": {"max_instances": 3}})
check(status == 200 and json.loads(text)["status"] == "updated model facebook/opt-125m",
      f"update ({status} {text})")
status, text = send("POST", "/update", {"model": "facebook/opt-125m", "num_gpus": 4,
                                        "auto_scaling_config": {"target": 1}})
check(status == 200 and any(w.startswith("num_gpus: not changed") for w in json.loads(text)["warnings"]),
      f"update names what it does not change ({text})")
status, text = send("POST", "/update", {"auto_scaling_config": {}})
check(status == 400 and "model" in json.loads(text)["detail"], f"update without a model ({text})")
status, text = send("POST", "/update", {"model": "nope/none", "auto_scaling_config": {}})
check(status == 404, f"update of an unknown model ({status} {text})")

# The official client: retrieve a model and an adapter; an unknown one is a NotFoundError.
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
m = client.models.retrieve("facebook/opt-125m")
check(m.id == "facebook/opt-125m" and m.owned_by == "sllm", "models.retrieve(base)")
a = client.models.retrieve("facebook/opt-125m:demo-lora1")
check(a.id == "facebook/opt-125m:demo-lora1" and a.model_extra["parent"] == "facebook/opt-125m",
      f"models.retrieve(adapter) has its parent ({a})")
a = client.models.retrieve("demo-lora2")
check(a.id == "facebook/opt-125m:demo-lora2", "an adapter by its name alone")
try:
    client.models.retrieve("nope/none")
    check(False, "an unknown model is not found")
except openai.NotFoundError:
    check(True, "an unknown model is a NotFoundError")
listed = {m.id: m for m in client.models.list()}
check(listed["facebook/opt-125m:demo-lora2"].model_extra["parent"] == "facebook/opt-125m",
      "models.list shows adapters with their parent")

# sllm delete facebook/opt-125m --lora-adapters demo-lora1
status, text = delete_model("facebook/opt-125m", lora_adapters="demo-lora1")
check(status == 200, f"delete an adapter ({status} {text})")
check(show_status() == ["facebook/opt-125m", "facebook/opt-125m:demo-lora2"], "the other stays")
status, text = delete_model("facebook/opt-125m", lora_adapters="demo-lora1")
check(status == 404 and "demo-lora1" in json.loads(text)["detail"], f"a removed adapter ({text})")
status, text = send("POST", "/delete", {"model": "facebook/opt-125m", "lora_adapters": 7})
check(status == 400 and "lora_adapters" in json.loads(text)["detail"], f"bad lora_adapters ({text})")

# sllm delete a/b c/d: one request each.
for m in ["a/b", "c/d"]:
    check(deploy_model(m, backend="sim")[0] == 200, f"register {m}")
for m in ["a/b", "c/d"]:
    status, text = delete_model(m)
    check(status == 200 and json.loads(text)["status"] == f"deleted model {m}", f"delete {m}")
check(show_status() == ["facebook/opt-125m", "facebook/opt-125m:demo-lora2"], "deleted ones go")
status, text = delete_model("nope/none")
check(status == 404, f"deleting an unknown model ({status} {text})")

print("all ServerlessLLM CLI checks passed")
