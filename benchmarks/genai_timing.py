"""Run by benchmarks/peers.py's genai_decode() in the peer venv (onnxruntime-genai is not installed beside
llmopt): greedy tokens and per-round decode tok/s of ONNX folders with a genai_config.json, in onnxruntime-genai's
own Generator. Argument: a JSON spec {"folders": {label: folder}, "prompt": [ids], "new_tokens", "threads",
"rounds"}; prints one JSON line {"tokens": {label: ids}, "decode": {label: [tok/s per round]}}."""

import json
import sys
import time

import onnxruntime_genai as og

spec = json.loads(sys.argv[1])
prompt, new_tokens = spec["prompt"], spec["new_tokens"]
models = {}
for label, folder in spec["folders"].items():
    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": spec["threads"]}}}}))
    models[label] = og.Model(config)


def generate(model, count):
    params = og.GeneratorParams(model)
    total = len(prompt) + count
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


tokens = {label: generate(model, new_tokens) for label, model in models.items()}
decode = {label: [] for label in models}
for _ in range(spec["rounds"]):
    for label, model in models.items():
        start = time.perf_counter()
        generate(model, 1)
        one = time.perf_counter() - start
        start = time.perf_counter()
        generate(model, new_tokens)
        every = time.perf_counter() - start
        decode[label].append((new_tokens - 1) / (every - one))
print(json.dumps({"tokens": tokens, "decode": decode}))
