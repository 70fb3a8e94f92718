"""GRPO weight sync: trainer host memory against depth, bytes per step, seconds per GB.

1. Memory. For each engine (plain: one process; zero3: `accelerate launch` of 2 CPU
   processes, DeepSpeed ZeRO-3 over gloo) and depth, a GRPO trainer on a mid-size model
   (hidden 512, 16 experts of 256, 8 heads) with one native rollout engine per process
   syncs every weight to its engine, then saves. A thread samples the trainer's RSS every
   2 ms; the peak above the RSS before each phase is printed for (and, of the sync, the RSS
   before it and its peak: a phase whose peak stays under its start prints about 0)
     - stream: this design (moetune.rl.engine_weights.weight_stream: one block gathered at
       a time, buckets of `--bucket-mb`, no copy kept by the pool);
     - copy: the previous design, a CPU copy of every weight gathered at once and kept by
       the pool (what `RolloutPool.weights` held), then sent;
     - save: the final save (`Checkpointer.save_weights`).
2. Bytes per step of LoRA GRPO: the adapter alone (native engines) against the merged
   tensors the adapters change (vLLM), for the shipped configs with the shipped recipes'
   LoRA (counted on the meta device: nothing is allocated).

One JSON line per configuration. Figures go to bench/RESULTS.md.

    python bench/weight_sync.py                      # plain and zero3 at 8 and 32 layers
    python bench/weight_sync.py --engines plain --layers 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from save_memory import WIDER  # the same mid-size model as the save bench

ROOT = Path(__file__).resolve().parent.parent


class PeakRSS:
    """`with PeakRSS() as peak:` ... then peak.extra_mb: the largest RSS of this process
    while the block ran, above its RSS when it began (sampled every 2 ms)."""

    def __enter__(self):
        import psutil

        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.extra_mb = (self.peak - self.start) / 2**20
        self.start_mb, self.peak_mb = self.start / 2**20, self.peak / 2**20


def child(config_file: str, output: str, bucket_mb: float) -> None:
    """One trainer process: sync (stream, then copy) and save, measured."""
    import torch

    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import leave_process_group, resolve
    from moetune.rl.data_parallel import DataParallel
    from moetune.rl.engine_weights import weight_stream
    from moetune.rl.grpo import GRPOTrainer, rollout_source
    from moetune.rl.rollout import RolloutPool
    from moetune.training.model_loading import load_model, load_tokenizer

    torch.set_num_threads(1)
    recipe = load_recipe(
        resolve("grpo/arith_tiny"),
        [
            "model.path=null",
            f"model.config={config_file}",
            "model.tokenizer=char",
            "rollout.backend=native",
            f"training.output_dir={output}",
        ],
    )
    parallel = DataParallel.from_environment()
    model, tokenizer = load_model(recipe.model), load_tokenizer(recipe.model)
    source = rollout_source(recipe, model, tokenizer, Path(output), write=parallel.is_main)
    parallel.barrier()
    with RolloutPool(
        source, backend="native", max_model_len=96, sync_bucket_mb=bucket_mb, timeout_s=600
    ) as pool:
        trainer = GRPOTrainer(recipe, model, tokenizer, None, pool, parallel)
        with PeakRSS() as stream:
            seconds = trainer.sync_rollout_weights(everything=True)
        sent = pool.synced_bytes
        with PeakRSS() as copy:
            kept = {name: t.detach().to("cpu", copy=True) for name, t in weight_stream(model)}
            pool.sync(kept)
        del kept
        with PeakRSS() as save:
            trainer.checkpointer.save_weights(Path(output) / "final")
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    print(
        "weight sync: "
        + json.dumps(
            {
                "rank": parallel.rank,
                "model_mb": full * 4 / 2**20,
                "rss_before_sync_mb": stream.start_mb,
                "stream_peak_rss_mb": stream.peak_mb,
                "stream_extra_rss_mb": stream.extra_mb,
                "copy_extra_rss_mb": copy.extra_mb,
                "save_extra_rss_mb": save.extra_mb,
                "sync_bytes": sent,
                "sync_s": seconds,
            }
        ),
        flush=True,
    )
    leave_process_group()  # as `moetune run` does: gloo's threads can abort an exiting process


def measure(engine: str, layers: int, bucket_mb: float, folder: Path) -> dict:
    """The larger rank's figures for one engine and depth."""
    config = json.loads((ROOT / "model/configs/tiny_arith.json").read_text())
    config_file = folder / f"config_{layers}.json"
    config_file.write_text(json.dumps(config | WIDER | {"num_hidden_layers": layers}))
    output = folder / f"{engine}_{layers}"
    args = [__file__, "--child", str(config_file), str(output), str(bucket_mb)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn the zero3 config into plain DDP
    if engine == "plain":
        command = [sys.executable, *args]
    else:
        command = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--config_file",
            f"recipes/accelerate/{engine}.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            "29533",
            *args,
        ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode:
        raise SystemExit(f"{engine} at {layers} layers failed:\n{done.stderr[-3000:]}")
    rows = [
        json.loads(line.removeprefix("weight sync: "))
        for line in done.stdout.splitlines()
        if line.startswith("weight sync: ")
    ]
    keys = ("stream_extra_rss_mb", "copy_extra_rss_mb", "save_extra_rss_mb", "sync_s")
    worst = {key: max(row[key] for row in rows) for key in keys}
    highest = max(rows, key=lambda row: row["stream_peak_rss_mb"])  # (its start beside it)
    worst |= {key: highest[key] for key in ("rss_before_sync_mb", "stream_peak_rss_mb")}
    return (
        {"layers": layers, "engine": engine, "model_mb": rows[0]["model_mb"]}
        | worst
        | {
            "sync_bytes": rows[0]["sync_bytes"],
            "s_per_gb": worst["sync_s"] / (rows[0]["sync_bytes"] / 1e9),
        }
    )


def adapter_bytes(recipe_name: str) -> dict:
    """Bytes per step of a shipped LoRA recipe: the adapter against the merged tensors it
    changes, counted on the meta device."""
    import torch

    from moetune.model import DeepseekV3ForCausalLM
    from moetune.model.lora import ExpertLora
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import resolve
    from moetune.rl.engine_weights import adapter_stream, weight_stream
    from moetune.training.model_loading import attach_lora, resolve_config

    recipe = load_recipe(resolve(recipe_name), [])
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(resolve_config(recipe.model)).to(torch.bfloat16)
    attach_lora(model, recipe.lora)
    model.model.mtp.requires_grad_(False)  # GRPO freezes them
    for module in model.modules():  # which experts an adapter holds: the bytes need the count
        if isinstance(module, ExpertLora):
            module.expert_ids = torch.arange(module.gate_A.shape[0])

    def size(stream) -> int:
        return sum(t.numel() * t.element_size() for _, t in stream)

    adapter = size(adapter_stream(model, trained_only=True))
    merged = size(weight_stream(model, trained_only=True))
    return {
        "recipe": recipe_name,
        "adapter_bytes": adapter,
        "merged_bytes": merged,
        "ratio": merged / adapter,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=["plain", "zero3"])
    parser.add_argument("--layers", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="sync bucket size")
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=["sft/deepseek_v2_lite_lora", "sft/moonlight_16b_lora", "sft/deepseek_v3_fp8_lora"],
        help="LoRA recipes whose bytes per step to count ([] skips)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], float(args.child[2]))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for engine in args.engines:
            for layers in args.layers:
                row = measure(engine, layers, args.bucket_mb, Path(folder))
                print(json.dumps(row), f"[{time.perf_counter() - started:.0f} s]", flush=True)
    for name in args.recipes:
        print(json.dumps(adapter_bytes(name)), flush=True)


if __name__ == "__main__":
    main()
