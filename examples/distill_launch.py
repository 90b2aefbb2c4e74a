"""Distill a student checkpoint against a teacher on several GPUs or nodes: llmopt's `distill` pass under
`accelerate launch` (`llmopt optimize` runs in one process, since it also exports and evaluates).

    # data parallel, 4 GPUs
    accelerate launch --multi_gpu --num_processes 4 examples/distill_launch.py STUDENT TEACHER TEXT OUT
    # FSDP2: weights sharded over the GPUs, for a student too big for one
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 4 examples/distill_launch.py ... \\
        --set steps=2000 batch_size=8 lr=1e-4 checkpoint_dir=/shared/run-1

STUDENT and TEACHER are model folders llmopt reads (safetensors; no remote code, no pickle), e.g. the student
a `prune-width` or `draft-model` recipe wrote with `--format safetensors` and the teacher the original. TEXT is
a local text file the training windows are drawn from. The main process writes the trained student to OUT
(safetensors and tokenizer) with `distill.json` (loss curve, tokens/s, processes, sharding); a next recipe
takes OUT as its `model`. `--set KEY=VALUE` sets any field of the pass (`llmopt schema --docs` lists them).
Each process loads both checkpoints into CPU memory first; under FSDP2 only its shards go to its GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student")
    parser.add_argument("teacher")
    parser.add_argument("text", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=256, help="training + held-out windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="distill pass fields (YAML values)")
    args = parser.parse_args(argv)

    import yaml
    from pydantic import ValidationError

    from llmopt.errors import LlmoptError

    try:
        fields = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    except ValueError:
        parser.error(f"--set takes KEY=VALUE, got {args.set}")
    try:
        info = distill(args, fields)
    except LlmoptError as error:
        print(f"{error.title}: {error.message}" + (f"\n{error.hint}" if error.hint else ""), file=sys.stderr)
        return int(error.exit_code)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        print(f"distill settings rejected: {problems}.\n`llmopt schema --docs` lists the distill pass's fields.",
              file=sys.stderr)
        return 2
    if info is not None:
        print(f"wrote {args.out}: {info['steps_done']} steps on {info['processes']} process(es) "
              f"({info['sharding'] or 'single'}), best held-out loss {info['best_eval_loss']}")
    return 0


def distill(args: argparse.Namespace, fields: dict) -> dict | None:
    """Run the pass; the main process saves the student and returns the pass's info, the others None."""
    from accelerate import PartialState

    from llmopt.evaluation.calibration import calibration_batches
    from llmopt.model import load_model, resolve_model
    from llmopt.passes.distill import DistillConfig, DistillPass
    from llmopt.state import ModelState, PassContext

    config = DistillConfig(**fields)  # checked before any model is loaded
    student, tokenizer = load_model(resolve_model(args.student))
    teacher, _ = load_model(resolve_model(args.teacher))
    windows, _ = calibration_batches(tokenizer, data=str(args.text), text_field="text", samples=args.samples,
                                     seq_len=args.seq_len, seed=args.seed)
    context = PassContext(seed=args.seed, calibration=lambda: windows, teacher=lambda: teacher)
    state = DistillPass(config).run(ModelState(student, tokenizer), context)
    info = state.pass_info["distill"]
    if not PartialState().is_main_process:  # every process ends with the same model: one writes it
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    state.model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "distill.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
    return info


if __name__ == "__main__":
    sys.exit(main())
