"""Run in a subprocess by tests/conftest.py `optimum_generate`: load an ONNX folder with optimum's
ORTModelForCausalLM and print its greedy tokens as JSON. It runs with optimum-onnx and the transformers < 4.58 that
optimum-onnx pins laid over the test environment (PYTHONPATH), because llmopt itself is on transformers 5: a user
who drives llmopt's artifacts with optimum does so in such an environment."""

import json
import sys

import torch
from optimum.onnxruntime import ORTModelForCausalLM


def main() -> None:
    folder, prompt, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model = ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider")
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    import transformers

    print(json.dumps({"tokens": out[0].tolist(), "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
