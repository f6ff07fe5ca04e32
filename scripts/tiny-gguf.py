#!/usr/bin/env python3
"""Writes a tiny llama-architecture GGUF model for tests that run a real llama.cpp server.

    tiny-gguf.py --vocab PATH --out PATH [--seed N] [--lora]

The weights are random (seeded, so the same arguments give the same bytes every run) and the
model is small enough to load in a fraction of a second and generate about a thousand tokens a
second on one core: 2 layers, width 64, 4 heads, context 2048. What it says is gibberish; what
matters is that the server really tokenizes, applies the chat template, samples and streams.

The tokenizer is copied whole from --vocab, a llama.cpp vocabulary-only GGUF (the tests use
ggml-vocab-llama-spm.gguf, the 32k SentencePiece llama vocab, which scripts/install-llama-server
keeps in its cache), with the ChatML tokens <|im_start|> and <|im_end|> appended as control tokens
and a ChatML chat template, so /v1/chat/completions renders prompts the way real chat models do.

The `gguf` package comes from llama.cpp's gguf-py: put it on PYTHONPATH or pass --gguf-py DIR;
without either this looks next to the vocabulary (CACHE/llama-cpp-VERSION/gguf-py). It needs
numpy and PyYAML (scripts/python-requirements.txt).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
N_CTX = 2048
ROPE_THETA = 10000.0
RMS_EPS = 1e-5

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, as Qwen and others ship it. String content only: llama-server flattens OpenAI content
# parts to text for templates that do not handle them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def import_gguf(explicit: str | None, vocab: Path):
    if explicit:
        sys.path.insert(0, explicit)
    else:
        try:
            import gguf  # noqa: F401  (from PYTHONPATH)
        except ImportError:
            sys.path.insert(0, str(vocab.resolve().parent.parent / "gguf-py"))
    try:
        import gguf
    except ImportError as e:
        sys.exit(f"tiny-gguf: cannot import llama.cpp's gguf package ({e}): set PYTHONPATH or pass --gguf-py")
    return gguf


def field_value(gguf, field):
    """A reader field's value in the form GGUFWriter.add_key_value takes (strings as raw bytes)."""
    vt = gguf.GGUFValueType
    main = field.types[0]
    if main == vt.ARRAY:
        sub = field.types[-1]
        if sub == vt.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        if sub == vt.ARRAY:
            raise ValueError(f"nested array in {field.name} is not supported")
        return [field.parts[i].tolist()[0] for i in field.data], main, sub
    if main == vt.STRING:
        return bytes(field.parts[field.data[0]]), main, None
    return field.parts[field.data[0]].tolist()[0], main, None


def write_lora(gguf, np, args) -> None:
    """A LoRA adapter for the tiny model, as llama.cpp's convert_lora_to_gguf.py lays one out:
    general.type "adapter", adapter.type "lora", and for each adapted weight W (ggml ne =
    [in, out]) a pair W.lora_a (ne [in, r]) and W.lora_b (ne [r, out]). Strong enough that
    greedy decoding with it differs from the base model's."""
    rank = 4
    rng = np.random.default_rng(1000 + args.seed)
    head_dim = N_EMBD // N_HEAD
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", dir=args.out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        for i in range(N_LAYER):
            for name, out_dim in (("attn_q", N_HEAD * head_dim), ("attn_v", N_HEAD_KV * head_dim),
                                  ("attn_output", N_EMBD)):
                base = f"blk.{i}.{name}.weight"
                a = (rng.standard_normal((rank, N_EMBD), dtype=np.float32) * 0.5).astype(np.float32)
                b = (rng.standard_normal((out_dim, rank), dtype=np.float32) * 0.5).astype(np.float32)
                w.add_tensor(base + ".lora_a", a)
                w.add_tensor(base + ".lora_b", b)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    print(f"tiny-gguf: wrote the LoRA adapter {args.out} (rank {rank}, seed {args.seed})", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", required=True, type=Path, help="a llama.cpp vocab GGUF (ggml-vocab-llama-spm.gguf)")
    ap.add_argument("--out", required=True, type=Path, help="the model file to write")
    ap.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    ap.add_argument("--gguf-py", help="folder holding llama.cpp's gguf package")
    ap.add_argument("--lora", action="store_true",
                    help="write a random LoRA adapter for the tiny model instead (rank 4 on every "
                         "attention projection; --vocab only locates the gguf package)")
    args = ap.parse_args()

    gguf = import_gguf(args.gguf_py, args.vocab)
    import numpy as np

    if args.lora:
        write_lora(gguf, np, args)
        return

    vt = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(args.vocab))

    tok: dict[str, tuple] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            tok[name] = field_value(gguf, field)
    for needed in ("tokenizer.ggml.tokens", "tokenizer.ggml.model"):
        if needed not in tok:
            sys.exit(f"tiny-gguf: {args.vocab} has no {needed}")

    tokens = list(tok["tokenizer.ggml.tokens"][0])
    n_orig = len(tokens)
    scores = list(tok["tokenizer.ggml.scores"][0]) if "tokenizer.ggml.scores" in tok else None
    types = list(tok["tokenizer.ggml.token_type"][0]) if "tokenizer.ggml.token_type" in tok else None
    ids: dict[str, int] = {}
    for special in (IM_START, IM_END):
        raw = special.encode()
        if raw in tokens:
            ids[special] = tokens.index(raw)
            if types is not None:
                types[ids[special]] = int(gguf.TokenType.CONTROL)
            continue
        ids[special] = len(tokens)
        tokens.append(raw)
        if scores is not None:
            scores.append(0.0)
        if types is not None:
            types.append(int(gguf.TokenType.CONTROL))
    n_vocab = len(tokens)

    tok["tokenizer.ggml.tokens"] = (tokens, vt.ARRAY, vt.STRING)
    if scores is not None:
        tok["tokenizer.ggml.scores"] = (scores, vt.ARRAY, vt.FLOAT32)
    if types is not None:
        tok["tokenizer.ggml.token_type"] = (types, vt.ARRAY, vt.INT32)
    tok["tokenizer.ggml.eos_token_id"] = (ids[IM_END], vt.UINT32, None)
    tok["tokenizer.ggml.eot_token_id"] = (ids[IM_END], vt.UINT32, None)
    # SentencePiece's default prefix space breaks grammar-constrained sampling (response_format)
    # on chat requests: the first generated piece would have to start with a space.
    tok["tokenizer.ggml.add_space_prefix"] = (False, vt.BOOL, None)
    tok["tokenizer.chat_template"] = (CHAT_TEMPLATE, vt.STRING, None)

    # GGUFWriter writes the file in place; write beside it and rename, so a reader never sees
    # half a model.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", dir=args.out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name("sllm-tiny")
        w.add_description(f"random weights (seed {args.seed}) for tests")
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        w.add_vocab_size(n_vocab)
        w.add_context_length(N_CTX)
        w.add_embedding_length(N_EMBD)
        w.add_block_count(N_LAYER)
        w.add_feed_forward_length(N_FF)
        w.add_head_count(N_HEAD)
        w.add_head_count_kv(N_HEAD_KV)
        w.add_rope_dimension_count(N_EMBD // N_HEAD)
        w.add_rope_freq_base(ROPE_THETA)
        w.add_layer_norm_rms_eps(RMS_EPS)
        for key in sorted(tok):
            val, main_type, sub = tok[key]
            w.add_key_value(key, val, main_type, sub)

        rng = np.random.default_rng(args.seed)
        head_dim = N_EMBD // N_HEAD

        def mat(rows: int, cols: int, std: float = 0.02):
            # numpy (rows, cols) is ggml ne = [cols, rows]: cols is the input width.
            return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16)

        def norm(n: int):
            return np.ones(n, dtype=np.float32)

        # Larger embeddings than a trained model's, so greedy decoding does not fall into one token.
        w.add_tensor("token_embd.weight", mat(n_vocab, N_EMBD, 1.0))
        for i in range(N_LAYER):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", norm(N_EMBD))
            w.add_tensor(p + "attn_q.weight", mat(N_HEAD * head_dim, N_EMBD, 0.2))
            w.add_tensor(p + "attn_k.weight", mat(N_HEAD_KV * head_dim, N_EMBD, 0.2))
            w.add_tensor(p + "attn_v.weight", mat(N_HEAD_KV * head_dim, N_EMBD, 0.2))
            w.add_tensor(p + "attn_output.weight", mat(N_EMBD, N_HEAD * head_dim, 0.2))
            w.add_tensor(p + "ffn_norm.weight", norm(N_EMBD))
            w.add_tensor(p + "ffn_gate.weight", mat(N_FF, N_EMBD, 0.2))
            w.add_tensor(p + "ffn_up.weight", mat(N_FF, N_EMBD, 0.2))
            w.add_tensor(p + "ffn_down.weight", mat(N_EMBD, N_FF, 0.2))
        w.add_tensor("output_norm.weight", norm(N_EMBD))
        w.add_tensor("output.weight", mat(n_vocab, N_EMBD, 0.5))

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    print(f"tiny-gguf: wrote {args.out} ({args.out.stat().st_size} bytes, {n_vocab} tokens, seed {args.seed})", file=sys.stderr)


if __name__ == "__main__":
    main()
