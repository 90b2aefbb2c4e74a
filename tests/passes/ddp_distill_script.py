"""Run by tests/passes/test_distill.py under `torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=true: the
distill pass, unchanged, on a tiny model; each process saves the weights it ends with
(argv[1] / rank-N.safetensors)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.*

from safetensors.torch import save_file  # noqa: E402

from tests.passes.test_distill import damaged, distill, token_windows, tiny_llama  # noqa: E402


def main() -> None:
    from accelerate import PartialState

    teacher = tiny_llama()
    student = damaged(teacher)
    info = distill(student, teacher, token_windows(), batch_size=2, grad_accum=1, steps=3)
    rank = PartialState().process_index
    save_file({n: p.detach().contiguous() for n, p in student.named_parameters()},
              str(Path(sys.argv[1]) / f"rank-{rank}.safetensors"), metadata={"processes": str(info["processes"])})


if __name__ == "__main__":
    main()
