"""HTTP serving of MoE models on one or many ranks (scripts/serve_moe.py): rank 0 runs the HTTP server and the
batch scheduler; every rank runs its share of each batch, and the MoE layers use the chosen strategy."""
