"""`moetune merge`: fold a LoRA adapter into its base and write a plain HF checkpoint."""

from __future__ import annotations

DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def merge(base: str, adapter: str, out: str, dtype: str = "bfloat16") -> None:
    """Load base in `dtype`, attach and merge the adapter in float32, save in `dtype`."""
    import torch

    from moetune.model import DeepseekV3ForCausalLM
    from moetune.model.adapters import load_adapter
    from moetune.model.lora import merge_lora

    model = DeepseekV3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    load_adapter(model, adapter)
    merge_lora(model)
    model.to(getattr(torch, dtype)).save_pretrained(out)


def run(args) -> int:
    merge(args.base, args.adapter, args.out, args.dtype)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge a LoRA adapter into its base model",
        description="Fold the LoRA adapter at --adapter (PEFT format, as moetune saves it) into "
                    "the base checkpoint at --base and write a full checkpoint that transformers "
                    "and vLLM load to --out. The merge is computed in float32.")
    parser.add_argument("--base", required=True, help="base checkpoint folder")
    parser.add_argument("--adapter", required=True, help="adapter folder")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the written weights (default: bfloat16)")
    parser.set_defaults(func=run)
