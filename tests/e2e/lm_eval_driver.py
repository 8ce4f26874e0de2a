"""Run the local multiple-choice task through lm-eval-harness's ``local-completions`` model.

Runs in a Python that has ``lm-eval`` (not a pagewire dependency; see test_lm_eval.py) against a
live pagewire router, and writes, per request lm-eval made, the token ids it scored (lm-eval's own
split of context and continuation) and the loglikelihood pagewire answered, as JSON.

    python lm_eval_driver.py BASE_URL MODEL_NAME TOKENIZER_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

HERE = Path(__file__).resolve().parent / "lm_eval_task"


def main(base_url: str, model: str, tokenizer: str, out: str) -> None:
    with tempfile.TemporaryDirectory() as tasks:
        # The data file's path must be absolute in the task YAML: write a copy that names it.
        yaml = (HERE / "pagewire_mc.yaml").read_text()
        jsonl = str(HERE / "pagewire_mc.jsonl")
        (Path(tasks) / "pagewire_mc.yaml").write_text(yaml.replace("PAGEWIRE_MC_JSONL", jsonl))
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=(f"model={model},base_url={base_url}/completions,tokenizer={tokenizer},"
                        "tokenized_requests=True,num_concurrent=1,max_retries=1"),
            tasks=["pagewire_mc"],
            task_manager=TaskManager(include_path=tasks),
            log_samples=True,
        )
    lm = lm_eval.api.registry.get_model("local-completions").create_from_arg_string(
        f"model={model},base_url={base_url}/completions,tokenizer={tokenizer}"
    )
    rows = []
    for sample in results["samples"]["pagewire_mc"]:
        for args, resp in zip(sample["arguments"], sample["resps"], strict=True):
            context, continuation = args[0], args[1]
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            rows.append({"context": context_ids, "continuation": continuation_ids,
                         "loglikelihood": float(resp[0][0])})
    acc = results["results"]["pagewire_mc"]["acc,none"]
    Path(out).write_text(json.dumps({"rows": rows, "acc": acc}))


if __name__ == "__main__":
    main(*sys.argv[1:])
