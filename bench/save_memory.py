"""Host memory of SFT's final save under ZeRO-3 and FSDP2: does it stay flat as the model deepens?

For each engine and depth, `accelerate launch` runs one step of sft/arith_tiny on 2 CPU
processes (gloo) with its tiny model (`--width tiny`: hidden 128) or a wider one (`--width
wide`: hidden 512, 16 experts of 256, 8 heads, no MTP) of the given number of layers, then
samples each rank's RSS every 2 ms through the final `save_model` (layer-by-layer gathering,
rank 0 writing). It prints, per rank, the RSS when training ended, the peak during the save
and their difference, against the model's full size: a save that gathered the whole model
would grow by about that size.

    python bench/save_memory.py                     # zero3 and fsdp2 at 8 and 32 layers, wide
    python bench/save_memory.py --width tiny        # the recipe's own width
    python bench/save_memory.py --engines zero3 --layers 8 16
    python bench/save_memory.py --width tiny --trim  # freed heap returned to the OS first

`--trim`: when training ends, each rank first returns the memory glibc's heap keeps freed
(`malloc_trim(0)`: the step's activations and gathered layers) to the OS, so that the RSS
at train end is what the rank holds (its shards, optimizer state, the runtime) and the
peak is that plus the save.
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

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
WIDER = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "num_nextn_predict_layers": 0,
}


class SaveMemory(TrainerCallback):
    """At the end of training, start sampling this process's RSS; at exit, print the RSS then
    and the peak since (the final save runs in between)."""

    def __init__(self, trainer):
        self.trainer, self.peak, self.start, self.stop = trainer, 0, 0, threading.Event()

    def on_train_end(self, args, state, control, **kwargs):
        import atexit

        import psutil

        if os.environ.get("SAVE_MEMORY_TRIM") == "1":
            from moetune.model.gathering import return_freed_host_memory

            return_freed_host_memory()
        process = psutil.Process()
        self.start = self.peak = process.memory_info().rss

        def sample():
            while not self.stop.wait(0.002):
                self.peak = max(self.peak, process.memory_info().rss)

        threading.Thread(target=sample, daemon=True).start()
        atexit.register(self.report)

    def report(self) -> None:
        self.stop.set()
        full = sum(getattr(p, "ds_numel", p.numel()) for p in self.trainer.model.parameters())
        rank = int(os.environ.get("RANK", "0"))
        print(
            "save memory: "
            + json.dumps(
                {
                    "rank": rank,
                    "before_mb": self.start / 2**20,
                    "peak_mb": self.peak / 2**20,
                    "model_mb": full * 4 / 2**20,
                }
            )
            + "\n",  # one write: the two ranks share the launcher's stdout
            end="",
            flush=True,
        )


def child(overrides: list[str]) -> None:
    from moetune.finetune.sft import run_sft
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import leave_process_group, resolve

    run_sft(load_recipe(resolve("sft/arith_tiny"), overrides), callbacks=[SaveMemory])
    leave_process_group()  # as `moetune run` does: gloo's threads can abort an exiting process


def measure(engine: str, layers: int, wide: bool, folder: Path, trim: bool) -> list[dict]:
    config = json.loads((ROOT / "model/configs/tiny_arith.json").read_text())
    config |= (WIDER if wide else {}) | {"num_hidden_layers": layers}
    config_file = folder / f"config_{layers}.json"
    config_file.write_text(json.dumps(config))
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", SAVE_MEMORY_TRIM=str(int(trim))
    )
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn every config into plain DDP
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            f"recipes/accelerate/{engine}.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            "29531",
            __file__,
            "--child",
            f"model.config={config_file}",
            "training.max_steps=1",
            "training.save_steps=1000",
            "training.per_device_train_batch_size=2",
            "data.arithmetic.count=64",
            "data.eval_fraction=0",
            "training.report_to=[]",
            "training.disable_tqdm=true",
            f"training.output_dir={folder / f'{engine}_{layers}'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"{engine} at {layers} layers failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("save memory: ")]
    return sorted(
        (json.loads(line.removeprefix("save memory: ")) for line in lines),
        key=lambda row: row["rank"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", nargs="+", default=["zero3", "fsdp2"])
    parser.add_argument("--layers", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--width", choices=("tiny", "wide"), default="wide")
    parser.add_argument(
        "--trim", action="store_true", help="return freed heap to the OS when training ends"
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    with tempfile.TemporaryDirectory(prefix="moetune-save-memory-") as folder:
        for engine in args.engines:
            growth, peak = {}, {}
            for layers in args.layers:
                started = time.perf_counter()
                rows = measure(engine, layers, args.width == "wide", Path(folder), args.trim)
                growth[layers] = max(row["peak_mb"] - row["before_mb"] for row in rows)
                peak[layers] = max(row["peak_mb"] for row in rows)
                for row in rows:
                    print(
                        f"{engine} {layers:3d} layers rank {row['rank']}: "
                        f"RSS {row['before_mb']:7.0f} MB "
                        f"at train end, peak {row['peak_mb']:7.0f} MB during the save "
                        f"(+{row['peak_mb'] - row['before_mb']:6.1f} MB; full model "
                        f"{row['model_mb']:6.0f} MB fp32) [{time.perf_counter() - started:.0f} s]"
                    )
            deepest, shallowest = max(growth), min(growth)
            print(
                f"{engine}: peak RSS during the save {peak[deepest]:.0f} MB at {deepest} layers vs "
                f"{peak[shallowest]:.0f} MB at {shallowest} "
                f"({peak[deepest] / peak[shallowest]:.2f}x); "
                f"growth over the save {growth[deepest]:.1f} vs {growth[shallowest]:.1f} MB"
            )


if __name__ == "__main__":
    main()
