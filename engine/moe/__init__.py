"""tessera's MoE layer: family-exact routing, dropless by default, experts on fused kernels."""
from engine.moe.experts import BACKENDS, ExpertWeights, default_backend, run_experts
from engine.moe.layer import MoEBlock
from engine.moe.router import RouterSpec

__all__ = ["BACKENDS", "ExpertWeights", "MoEBlock", "RouterSpec", "default_backend", "run_experts"]
