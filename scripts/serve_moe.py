"""Serve a MoE model over HTTP on one node's GPUs (or CPU worker processes), one rank per device.

    torchrun --nproc-per-node 4 scripts/serve_moe.py [--model NAME] [--config configs/serve/X.yaml]
             [--strategy auto] [--host 127.0.0.1] [--port 8000]
    python scripts/serve_moe.py ...          # one process, no torchrun

Rank 0 runs the scheduler; every rank runs its share of each batch through attention, and the MoE layers use the
chosen strategy across ranks. The HTTP server runs in a process of its own beside rank 0 for generation with the
continuous scheduler (engine.serving.api_process), inside rank 0 for embeddings and the static batcher. With no
model named, it serves `minilm-moe`: the real all-MiniLM-L6-v2 upcycled into 8 experts per layer, built offline in
seconds and cached. SIGTERM drains the requests in flight, then exits 0; a rank that dies makes the server exit
non-zero.
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML settings (configs/serve/default.yaml); flags override them")
    parser.add_argument("--model")
    parser.add_argument("--strategy", choices=["single", "moeshard", "ep", "ep-capacity", "auto"])
    parser.add_argument("--backend", choices=["triton", "torch", "reference", "eager"])
    parser.add_argument("--dtype")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--max-batch-tokens", type=int)
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-wait-ms", type=float)
    parser.add_argument("--max-queue", type=int)
    parser.add_argument("--max-input-tokens", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--scheduler", choices=["continuous", "static"])
    parser.add_argument("--kv-cache-bytes", type=int, help="KV budget per rank (default: a fraction of free memory)")
    parser.add_argument("--kv-cache-fraction", type=float)
    parser.add_argument("--kv-block-size", type=int)
    parser.add_argument("--step-tokens", type=int, help="tokens per rank per step (prefill chunk size)")
    parser.add_argument("--adapters", help="a saved TaskRouter folder (enables \"adapter\": \"auto\")")
    parser.add_argument("--enable-lora", action="store_true", default=None,
                        help="accept adapters loaded at run time (POST /v1/load_lora_adapter)")
    parser.add_argument("--lora-budget-bytes", type=int, help="device bytes per rank for adapter weights")
    parser.add_argument("--api-key", help="every /v1 endpoint then needs 'Authorization: Bearer KEY' "
                                          "(better: set TESSERA_API_KEY, which other users cannot see in ps)")
    parser.add_argument("--chat-template", help="a Jinja chat template file for /v1/chat/completions, replacing "
                                                "the tokenizer's own (models without a tokenizer have none)")
    parser.add_argument("--max-model-len", type=int,
                        help="prompt + completion tokens per request (default: the model's position limit)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from engine.loader import load
    from engine.registry import _entry_for
    from engine.serving.config import ServeConfig
    from engine.serving.coordinator import Coordinator, follow
    from engine.serving.lora_api import AdapterNames
    from engine.serving.runner import Runner, model_kind
    from engine.serving.tokenizer import load_tokenizer

    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    config = ServeConfig.load(args.config, **overrides)
    config.api_key = config.api_key or os.environ.get("TESSERA_API_KEY") or None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    strategy = "single"
    if world > 1:
        from engine.parallel import init_distributed

        dist_info = init_distributed(timeout_s=config.rank_timeout_s)
        rank, strategy = dist_info.rank, config.strategy
        device = dist_info.device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, folder = _entry_for(config.model)
    model = load(config.model, backend=config.backend, dtype=config.dtype, device=device, strategy=strategy)
    tokenizer = load_tokenizer(folder, model.config.vocab_size, config.chat_template)
    model, router = attach_pool(model, config)
    runner = Runner(model, tokenizer, rank, world)
    if config.scheduler == "continuous" and model_kind(model) in ("decoder", "seq2seq"):
        runner.batch = rank_batch(model, config, tokenizer, world)
    coordinator = Coordinator(runner, world, config.rank_timeout_s)
    # Loading leaves millions of long-lived objects (torch's, transformers', the model's) that every full
    # collection of the cyclic garbage collector walks again. On the decode benchmark those collections took up to
    # 0.5 s each, about 5 % of rank 0's time under load, and every other rank waited through them in its
    # collectives. Frozen, they are left out of every later collection (vLLM does the same after start-up).
    gc.collect()
    gc.freeze()
    if rank != 0:
        for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 drains, then tells us to stop (Ctrl-C in a
            signal.signal(sig, signal.SIG_IGN)          # terminal reaches every rank)
        follow(coordinator)
        return 0
    names = AdapterNames.of(model)  # live: adapters loaded and unloaded at run time
    kind = model_kind(model)
    context = config.max_model_len or (getattr(model.config, "max_position_embeddings", None)
                                       if kind == "decoder" else None)
    return serve(config, coordinator, tokenizer, kind, router, names, context, folder)


def rank_batch(model, config, tokenizer, world: int):
    """This rank's running batch for the continuous scheduler, over a paged KV cache of the configured budget."""
    from engine.serving.paged_batch import kv_blocks_for_budget
    from engine.serving.scheduler import batch_class

    longest = -(-(config.max_input_tokens + config.max_new_tokens) // config.kv_block_size)
    blocks = kv_blocks_for_budget(model, config.kv_block_size, config.kv_cache_bytes, config.kv_cache_fraction,
                                  most_useful=config.max_batch_size * longest)
    batch = batch_class(model)  # decoders: RankBatch; encoder-decoders: EncDecBatch, a budget of cached tokens
    return batch(model, num_blocks=blocks, block_size=config.kv_block_size, step_tokens=config.step_tokens,
                 max_requests=config.max_batch_size, pad_token_id=tokenizer.pad_token_id, dummy_when_idle=world > 1)


def attach_pool(model, config):
    """LoRA adapters for completions: a TaskRouter folder, a mapping adapter name -> PEFT folder, or (with
    enable_lora) an empty pool that /v1/load_lora_adapter fills; within `lora_budget_bytes` on the device."""
    adapters = config.adapters
    if not adapters and not config.enable_lora:
        return model, None
    from engine.lora import AdapterPool, attach_adapters
    from engine.lora.router import TaskRouter

    router = TaskRouter.load(adapters) if isinstance(adapters, str) else None
    pool = router if router is not None else (adapters or AdapterPool())
    lm = attach_adapters(model, pool, cache_bytes=config.lora_budget_bytes)
    if router is not None and config.lora_budget_bytes is not None:
        fit = config.lora_budget_bytes // lm.cache.bytes_per_adapter
        if fit < min(router.k, len(lm.pool)):
            raise SystemExit(f"lora_budget_bytes={config.lora_budget_bytes} holds {fit} adapter(s) but the router "
                             f"mixes up to k={router.k} per request")
    return lm, router


def serve(config, coordinator, tokenizer, kind: str, router=None, adapter_names=None,
          context_length: int | None = None, tokenizer_folder=None) -> int:
    """The continuous scheduler serves from an API process of its own (engine.serving.api_process says why);
    encoders and the static batcher serve HTTP from rank 0 itself."""
    from engine.serving.app import create_app
    from engine.serving.batcher import BatchEngine
    from engine.serving.lora_api import AdapterNames, mount
    from engine.serving.metrics import Metrics
    from engine.serving.api_process import http_server, serving_line

    continuous = coordinator.runner.batch is not None
    metrics = Metrics(http=not continuous)
    adapter_names = adapter_names if adapter_names is not None else AdapterNames.of(coordinator.runner.model)
    if coordinator.world == 1:
        metrics.routing_reader = coordinator.runner.routing_counts
    if continuous:
        from engine.serving.scheduler import ContinuousEngine

        engine = ContinuousEngine(coordinator, metrics, tokenizer, max_queue=config.max_queue,
                                  max_running_per_rank=config.max_batch_size, heartbeat_s=config.heartbeat_s,
                                  router=router)
        engine.start()
        return serve_from_api_process(engine, config, metrics, kind, adapter_names, context_length,
                                      tokenizer_folder, coordinator.runner.model.config.vocab_size)
    engine = BatchEngine(coordinator, config, metrics, router)
    engine.start()
    app = create_app(engine, config, tokenizer, config.model, kind, metrics, adapter_names, context_length)
    mount(app, engine, adapter_names, config.model)
    server = http_server(app, config)
    print(serving_line(config, kind, coordinator.world), flush=True)
    server.run()  # returns after SIGTERM/SIGINT, once requests in flight have finished
    engine.stop(timeout=config.drain_timeout_s)
    print("tessera: drained, exiting", flush=True)
    return 0 if engine.healthy else 1


def serve_from_api_process(engine, config, metrics, kind, adapter_names, context_length, tokenizer_folder,
                           vocab_size) -> int:
    """Rank 0 steps the ranks; the HTTP server runs in a process of its own and reaches the engine over a pipe.
    SIGTERM or SIGINT here drains it; once it has exited, the ranks stop."""
    from engine.serving.api_process import RankZeroBridge

    bridge = RankZeroBridge(engine, metrics, adapter_names.pool_names)
    settings = dict(config=config, kind=kind, world=engine.world, router=True if engine.router else None,
                    context_length=context_length, tokenizer_folder=tokenizer_folder, vocab_size=vocab_size)
    api = bridge.launch(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: bridge.drain())
    code = api.wait()  # returns after a drain, or when the API process failed
    engine.stop(timeout=config.drain_timeout_s)
    print("tessera: drained, exiting" if code == 0 else f"tessera: the API process exited with {code}", flush=True)
    return 0 if engine.healthy and code == 0 else 1


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from engine.parallel.runtime import exit_rank

        exit_rank(code)
    sys.exit(code)
