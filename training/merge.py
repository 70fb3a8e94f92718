"""`moetune merge`: fold a LoRA adapter into its base and write a plain HF checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "moetune_template.json",
)


def merge(base: str, adapter: str, out: str, dtype: str = "bfloat16", fp8: bool = False) -> None:
    """Load the base, attach and merge the adapter in float32, save in `dtype`; with `fp8`,
    save the decoder's linears and experts as DeepSeek-style FP8 (128x128 blocks with
    `weight_scale_inv`, `quantization_config`), the rest in `dtype`."""
    import torch

    from moetune.model import DeepseekV3ForCausalLM
    from moetune.model.adapters import load_adapter
    from moetune.model.lora import merge_lora

    model = DeepseekV3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    load_adapter(model, adapter)
    merge_lora(model)
    model.to(getattr(torch, dtype))
    if fp8:
        from moetune.model.fp8 import to_frozen_fp8

        to_frozen_fp8(model)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # the merged folder serves vLLM and `moetune eval` as is
        if (Path(base) / name).exists():
            shutil.copyfile(Path(base) / name, Path(out) / name)


def run(args) -> int:
    merge(args.base, args.adapter, args.out, args.dtype, args.fp8)
    print(
        f"merged {args.adapter} into {args.base} -> {args.out}"
        + (" (FP8 weights)" if args.fp8 else "")
    )
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model",
        description="Fold the LoRA adapter at --adapter (PEFT format, as moetune saves it) into "
        "the base checkpoint at --base and write a full checkpoint that transformers "
        "and vLLM load to --out. The merge is computed in float32.",
    )
    parser.add_argument("--base", required=True, help="base checkpoint folder")
    parser.add_argument("--adapter", required=True, help="adapter folder")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="dtype of the written weights (default: bfloat16)",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="write the decoder's weights as block-scaled FP8 (DeepSeek's format)",
    )
    parser.set_defaults(func=run)
