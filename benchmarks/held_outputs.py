"""Page faults of a model's prefill forwards while small gate outputs are held across forwards.

No moewatch here: a plain forward hook on each gate of the Mixtral-shaped model of
``overhead.py`` keeps the gate's outputs (by reference, or copies with ``--copies``) for
``--held`` forwards, then drops them, as a monitor that reduces later does. Printed per phase
(the model alone, outputs held, released): each forward's wall milliseconds and the process's
minor page faults. With glibc's default malloc, small blocks kept alive between a forward's
large temporaries make the allocator give memory back to the system and fault it in again.

    python benchmarks/held_outputs.py --held 8
    python benchmarks/held_outputs.py --held 8 --copies
    python benchmarks/held_outputs.py --held 8 --pooled heap
    python benchmarks/held_outputs.py --held 8 --pooled mapped
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import Clock, mixtral_shaped, prefill_forward  # noqa: E402


def phase(label: str, forward, forwards: int) -> None:
    """Run ``forwards`` forwards; print each one's (wall ms, minor page faults)."""
    samples = []
    for _ in range(forwards):
        with Clock() as clock:
            forward()
        samples.append((round(clock.wall * 1e3), clock.faults))
    print(f"{label:<24} (ms, faults) a forward: {samples}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held", type=int, default=8, help="forwards whose gate outputs are kept")
    parser.add_argument("--copies", action="store_true", help="keep copies of the outputs, not the outputs")
    parser.add_argument("--pooled", choices=("heap", "mapped"),
                        help="copy the outputs into buffers allocated once and reused, not fresh ones: "
                             "from malloc's heap, or from memory mapped apart from it")
    parser.add_argument("--forwards", type=int, default=10, help="forwards a phase")
    args = parser.parse_args(argv)
    model = mixtral_shaped(1024, 4, 8, 2, 8192)
    run = prefill_forward(4, 128, 8192)

    def forward() -> None:
        run(model, {}, None)

    gates = [module for name, module in model.named_modules() if name.endswith("mlp.gate")]
    held: list = []
    pool: dict = {}  # slot -> the buffers it copies into, allocated at its first use
    arena = mmap.mmap(-1, 256 * 2**20)  # the pool's memory: mapped apart from malloc's heap
    used = [0]

    def buffer_like(t: torch.Tensor) -> torch.Tensor:
        if args.pooled == "heap":
            return torch.empty_like(t)
        start = used[0]
        used[0] += (t.nbytes + 63) // 64 * 64
        array = np.frombuffer(arena, dtype=torch.empty((), dtype=t.dtype).numpy().dtype, count=t.numel(), offset=start)
        return torch.from_numpy(array).view(t.shape)

    def keep(module, inputs, output) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        if args.pooled:
            slot = len(held)
            buffers = pool.get(slot) or pool.setdefault(slot, [buffer_like(t) for t in outputs])
            for buffer, t in zip(buffers, outputs):
                buffer.copy_(t)
            outputs = tuple(buffers)
        elif args.copies:
            outputs = tuple(t.clone() for t in outputs)
        held.append(outputs)
        if len(held) >= args.held * len(gates):
            held.clear()

    print(f"torch {torch.__version__}; {len(gates)} gates, prefill 4 x 128; outputs held for {args.held} "
          f"forwards ({f'copies in {args.pooled} buffers reused' if args.pooled else 'copies' if args.copies else 'by reference'})")
    phase("the model alone", forward, args.forwards)
    handles = [gate.register_forward_hook(keep) for gate in gates]
    phase("gate outputs held", forward, args.forwards)
    for handle in handles:
        handle.remove()
    held.clear()
    phase("released", forward, args.forwards)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
