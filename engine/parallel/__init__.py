"""Multi-GPU MoE inference over torch.distributed: MoEShard (a slice of every expert on every rank), expert
parallelism (whole experts per rank, dropless or with DeepSpeed's capacity factor) and a cost-model `auto`.
One code path for NCCL on GPUs and gloo on CPU processes; launched by torchrun. See docs/parallel.md."""
from engine.parallel.generation import generate_lockstep
from engine.parallel.runtime import Dist, init_distributed
from engine.parallel.strategy import STRATEGIES, apply_strategy

__all__ = ["STRATEGIES", "Dist", "apply_strategy", "generate_lockstep", "init_distributed"]
