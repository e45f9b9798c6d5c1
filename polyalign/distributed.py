"""Running under several processes (torchrun / accelerate launch): who am I, and which share of a step is mine."""
from __future__ import annotations

import os

from polyalign.errors import PolyalignError


def launch_state(device: str = "auto"):
    """(rank, world, state) — accelerate's state only when launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch
        from accelerate import PartialState
        # Without cpu=True accelerate ignores a CPU-only torchrun / accelerate launch and every process
        # would believe it is the only one (each scoring everything into the same files).
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=cpu)
        if state.num_processes != world:
            raise PolyalignError(f"launched with WORLD_SIZE={world} but accelerate set up {state.num_processes} "
                                 f"process(es) ({state.distributed_type}); check the launcher and --device")
        return state.process_index, state.num_processes, state
    return 0, 1, None
