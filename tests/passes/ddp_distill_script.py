"""Run by tests/passes/test_distill.py under `torchrun` with ACCELERATE_USE_CPU=true: the distill pass,
unchanged, on a tiny model; each process saves the weights it ends with.

    ddp_distill_script.py OUT ddp [tied]    # data parallel: OUT/rank-N.safetensors after 3 steps
    ddp_distill_script.py OUT fsdp [tied]   # the same under accelerate's FSDP2 (ACCELERATE_USE_FSDP=true,
                                            # FSDP_VERSION=2), then a train_only run, uninterrupted
                                            # (OUT/whole-N) and interrupted at step 3 then resumed (OUT/resumed-N)

`tied`: the model's lm_head is its embedding, as in SmolLM2.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.*

from safetensors.torch import save_file  # noqa: E402

from tests.passes.test_distill import damaged, distill_state, token_windows, tiny_llama  # noqa: E402

# batch_size 1: the 3 held-out windows split 2 + 1, so the second process pads its evaluation (FSDP's forward is
# collective, and a process that stopped early would hang the other).
RESUME_CONFIG = {"steps": 4, "batch_size": 1, "eval_every": 2, "checkpoint_every": 2, "train_only": ["*.self_attn.*"]}


def allow_fsdp_on_cpu() -> None:
    """accelerate turns FSDP on only for accelerator backends (AcceleratorState leaves MULTI_CPU out of that
    check), while torch's FSDP2 itself runs on CPU processes over gloo. Lift that one gate, so the pass runs
    under accelerate's own FSDP2 wrapping (fully_shard, its optimizer swap, its clipping) on this machine."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does on GPUs

    AcceleratorState.__init__ = init


def train(student, teacher, **options):
    """The pass's output model (under FSDP a rebuilt module, not `student`) and its report info."""
    state = distill_state(student, teacher, token_windows(), **options)
    return state.model, state.pass_info["distill"]


def save(student, info: dict, path: Path) -> None:
    """The weights, and the logits on a probe batch (`probe_logits`), which also read the rotary buffers."""
    import torch

    with torch.no_grad():
        logits = student(input_ids=torch.from_numpy(token_windows(count=2)[0][None])).logits[0]
    save_file({"probe_logits": logits, **{n: p.detach().contiguous() for n, p in student.named_parameters()}}, str(path),
              metadata={"processes": str(info["processes"]), "sharding": str(info["sharding"]),
                        "resumed_from_step": str(info["resumed_from_step"]),
                        "parameters_per_process": str(info["parameters_per_process"]), "class": type(student).__name__,
                        "eval_losses": json.dumps([row[2] for row in info["loss_curve"] if row[2] is not None])})


def main() -> None:
    from accelerate import PartialState

    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "fsdp":
        allow_fsdp_on_cpu()
    teacher = tiny_llama(tie="tied" in sys.argv[3:])  # tied: the lm_head is the embedding, as in SmolLM2
    model, info = train(damaged(teacher), teacher, batch_size=2, grad_accum=1, steps=3)
    rank = PartialState().process_index  # after the pass's Accelerator, which set the state up for CPU processes
    save(model, info, out / f"rank-{rank}.safetensors")
    if mode != "fsdp":
        return
    save(*train(damaged(teacher), teacher, checkpoint_dir=str(out / "a"), **RESUME_CONFIG),
         out / f"whole-{rank}.safetensors")

    def interrupt(step, total):
        if step == 3:
            raise KeyboardInterrupt
    try:
        train(damaged(teacher), teacher, checkpoint_dir=str(out / "b"), progress=interrupt, **RESUME_CONFIG)
    except KeyboardInterrupt:
        pass
    save(*train(damaged(teacher), teacher, checkpoint_dir=str(out / "b"), **RESUME_CONFIG),
         out / f"resumed-{rank}.safetensors")


if __name__ == "__main__":
    main()
