"""HTTP serving of MoE models on one or many ranks (scripts/serve_moe.py): rank 0 runs the scheduler, and the HTTP
server beside it in a process of its own (engine.serving.api_process) or, for embeddings and the static batcher,
inside it; every rank runs its share of each batch, and the MoE layers use the chosen strategy."""
