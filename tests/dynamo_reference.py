"""The reference side of tests/test_dynamo.py: one vLLM engine without kvbm (nor Dynamo) answers
every turn of the same conversations greedily. Usage: dynamo_reference.py SPEC.json OUT.json"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(open(sys.argv[1]).read())
    llm = LLM(model=spec["model"], block_size=128, enforce_eager=True, dtype="float32", max_model_len=2048,
              seed=0)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    replies: list[list[str]] = []
    for conv in spec["convs"]:
        prefixes = [conv[:k] for k, message in enumerate(conv) if message["role"] == "assistant"]
        outputs = llm.chat(prefixes, params, use_tqdm=False)
        replies.append([o.outputs[0].text for o in outputs])
    with open(sys.argv[2], "w") as out:
        json.dump(replies, out)


if __name__ == "__main__":
    main()
